"""Run lm-evaluation-harness's `local-completions` model against a gam-serve URL; print one JSON line.

Executed by tests/server/test_lm_eval.py in lm-eval's own virtualenv (lm-eval needs huggingface_hub >= 1, the
TGI client of the main venv pins it < 1), so it imports nothing from this project.

    python lm_eval_client.py URL MODEL '{"loglikelihood": [[ctx, cont], ...], "generate_until": [[ctx, stop, n]],
                                        "rolling": [text, ...]}'
"""

from __future__ import annotations

import json
import sys

from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI


def main() -> None:
    url, model, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    # tokenizer_backend "auto": lm-eval finds /tokenizer_info + /tokenize and tokenizes through the server
    lm = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model=model, max_length=256, num_concurrent=1)
    ll = lm.loglikelihood([Instance("loglikelihood", {}, tuple(p), i) for i, p in enumerate(spec["loglikelihood"])])
    gen = lm.generate_until(
        [
            Instance("generate_until", {}, (ctx, {"until": stop, "max_gen_toks": n}), i)
            for i, (ctx, stop, n) in enumerate(spec["generate_until"])
        ]
    )
    rolling = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(spec.get("rolling", []))]
    )
    out = {"tokenizer": type(lm.tokenizer).__name__, "loglikelihood": ll, "generate_until": gen, "rolling": rolling}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
