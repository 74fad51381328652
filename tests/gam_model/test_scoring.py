"""Next-token scoring (gam_model.scoring): exact under the served semantics, as prompt logprobs and for gam-eval."""

from __future__ import annotations

import pytest
import torch

from gam_model.decode import Decoder
from gam_model.scoring import tail_window_logits, token_logprobs
from tests.conftest import tiny_model


@pytest.mark.parametrize(("n", "head_chunk"), [(1, None), (2, None), (17, None), (40, None), (17, 3), (40, 7)])
def test_token_logprobs_equal_the_served_next_token_distribution(n, head_chunk):
    """Prompt logprobs (O(N) scoring) equal log-softmax of what the server's own prefill answers for each prefix."""
    model = tiny_model(seed=n, block_size=16, conv_kernel=3, n_layer=2)
    ids = torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n))
    # 40 tokens: the block_size head (whole, or in chunks of head_chunk < R = 5 positions) and window chunks
    out = token_logprobs(model, ids, top_n=3, batch_size=5, head_chunk=head_chunk)
    assert len(out.logprobs) == len(out.top_ids) == len(out.top_logprobs) == n - 1
    dec = Decoder(model, num_slots=1)
    slot = dec.allocate()
    for i in range(1, n):
        lp = dec.prefill([slot], [ids[:i].tolist()])[0].double().log_softmax(-1)  # (V,) the served semantics
        assert out.logprobs[i - 1] == pytest.approx(lp[ids[i]].item(), abs=1e-4)
        vals, idx = lp.topk(3)
        assert out.top_ids[i - 1] == idx.tolist()
        assert out.top_logprobs[i - 1] == pytest.approx(vals.tolist(), abs=1e-4)
    # the chosen token's logprob is the same number as its entry among the alternatives (clients compare them)
    for j, (lp, ti, tl) in enumerate(zip(out.logprobs, out.top_ids, out.top_logprobs, strict=True)):
        assert lp <= tl[0]
        if int(ids[j + 1]) in ti:
            assert lp == tl[ti.index(int(ids[j + 1]))]


def test_tail_window_is_exact_and_wider_windows_agree(model):
    ids = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
    ref = model(ids)[:, -1]  # (3, V): contexts of exactly block_size tokens
    R = model.config.receptive_field
    for w in (R, R + 3, 32):
        torch.testing.assert_close(tail_window_logits(model, ids[:, -w:]), ref, rtol=1e-5, atol=1e-5)
    # a window shorter than R misses real context: the test above could fail
    assert not torch.allclose(tail_window_logits(model, ids[:, -(R - 1) :]), ref, atol=1e-5)
