"""What crosses between the HTTP frontend and the engine core process: msgspec structs, msgpack-encoded, over one zmq
DEALER (frontend) / ROUTER (core) pair.

Frontend -> core: Hello, Submit, Cancel, Drain, Shutdown, MetricsQuery. Core -> frontend: Ready or Failed (once, after
the model is loaded), CoreOutput (after each engine iteration, and after inputs that changed something) and
MetricsText. One CoreOutput carries a whole step as columns (request ids, token ids, logprobs as packed arrays);
per-row extras (finish, top-n, prompt logprobs, errors) only for the rows that have them. Never one message per token.
"""

from __future__ import annotations

import msgspec
import numpy as np

from gam_model.sampling import SamplingParams
from gam_model.scoring import TokenLogprobs


class GenerationRequest(msgspec.Struct):
    """One sequence to generate: prompt ids, sampling parameters and stop conditions."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: list[str] = []
    stop_token_ids: set[int] = set()
    endpoint: str = "generate"  # metrics label
    # prompt logprobs (TGI decoder_input_details, OpenAI echo + logprobs): None = not asked, n = with top-n
    # alternatives. O(prompt) work in the engine core at admission, unlike the O(R) prefill. With max_new_tokens 0
    # the request only scores its prompt (OpenAI echo + max_tokens 0): no prefill, no token.
    prompt_logprobs: int | None = None

    def validate(self) -> None:
        """Raise ValueError for a request the engine cannot run."""
        if not self.prompt_ids:
            raise ValueError("empty prompt")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


# a request id is the frontend's index << FRONTEND_SHIFT | its own counter: the core routes outputs by it
FRONTEND_SHIFT = 40


# -- frontend -> core -------------------------------------------------------------------------------------------
class Hello(msgspec.Struct, tag=True):
    frontend: int


class Submit(msgspec.Struct, tag=True):
    """The sequences of one API call, all or none; answered by a Reply in a CoreOutput."""

    frontend: int
    token: int
    ids: list[int]
    requests: list[GenerationRequest]
    arrival: float  # time.monotonic() (one clock for every process on the host)
    deadline: float


class Cancel(msgspec.Struct, tag=True):
    ids: list[int]
    failed: bool = False  # the frontend ended them with an error (counted as such), not their clients


class Drain(msgspec.Struct, tag=True):
    grace: float | None


class Shutdown(msgspec.Struct, tag=True):
    pass


class MetricsQuery(msgspec.Struct, tag=True):
    token: int


class Failure(msgspec.Struct, tag=True):
    """An API call this frontend answered with an error (for gam_request_failures_total)."""

    endpoint: str
    error_type: str


ToCore = Hello | Submit | Cancel | Drain | Shutdown | MetricsQuery | Failure


# -- core -> frontend -------------------------------------------------------------------------------------------
class Facts(msgspec.Struct):
    """What the frontend reports about the loaded model (/info, /v1/models, gam_model_info)."""

    model_id: str
    dtype: str
    quantization: str
    device: str
    num_params: int
    dtype_bytes: int
    state_bytes_per_sequence: int
    cuda_graphs: bool
    overlap: bool  # the overlap scheduler is on (gam_model/batch.py)
    created: int  # unix time the core loaded the model (OpenAI `created`): the same through every frontend


class Ready(msgspec.Struct, tag=True):
    facts: Facts


class Failed(msgspec.Struct, tag=True):
    message: str


class Reply(msgspec.Struct, array_like=True):
    """The answer to a Submit: error None = queued; else the exception's kind and message."""

    frontend: int
    token: int
    error: str | None = None  # QueueFull, TooManySequences, EngineUnavailable, ValueError
    message: str = ""


class Finish(msgspec.Struct, array_like=True):
    reason: str  # eos_token, stop_sequence, length
    generated: int
    seed: int | None  # None for greedy rows


class Error(msgspec.Struct, array_like=True):
    id: int
    message: str
    status: int
    kind: str  # the API error_type


class CoreOutput(msgspec.Struct, tag=True):
    """One engine iteration's results (or the effect of inputs), with the core's counts after it."""

    ids: bytes = b""  # (B,) int64 request id of each row that got a token
    tokens: bytes = b""  # (B,) int64
    logprobs: bytes = b""  # (B,) float32
    finished: dict[int, Finish] = {}  # row -> how that request ended
    top: dict[int, tuple[list[int], list[float]]] = {}  # row -> top-n alternatives (rows that asked)
    prompts: dict[int, TokenLogprobs] = {}  # request id -> prompt logprobs (with its first token, or its score)
    scored: list[int] = []  # requests that only scored their prompt (max_new_tokens 0): done
    errors: list[Error] = []
    replies: list[Reply] = []
    running: int = 0
    waiting: int = 0
    free_slots: int = 0

    def columns(self) -> tuple[list[int], list[int], list[float]]:
        """(request ids, token ids, logprobs) as Python lists."""
        ids = np.frombuffer(self.ids, np.int64).tolist()
        return ids, np.frombuffer(self.tokens, np.int64).tolist(), np.frombuffer(self.logprobs, np.float32).tolist()

    def split(self, frontends: list[int]) -> dict[int, CoreOutput]:
        """This output cut into each frontend's part (its rows, requests and replies; the counts go to all)."""
        if len(frontends) == 1:
            return {frontends[0]: self}
        ids = np.frombuffer(self.ids, np.int64)
        owner = ids >> FRONTEND_SHIFT
        tokens, logprobs = np.frombuffer(self.tokens, np.int64), np.frombuffer(self.logprobs, np.float32)
        parts = {}
        for f in frontends:
            rows = np.flatnonzero(owner == f)  # ascending: a row's new index is its position here
            part = CoreOutput(
                ids=ids[rows].tobytes(),
                tokens=tokens[rows].tobytes(),
                logprobs=logprobs[rows].tobytes(),
                prompts={i: v for i, v in self.prompts.items() if i >> FRONTEND_SHIFT == f},
                scored=[i for i in self.scored if i >> FRONTEND_SHIFT == f],
                errors=[e for e in self.errors if e.id >> FRONTEND_SHIFT == f],
                replies=[r for r in self.replies if r.frontend == f],
                running=self.running,
                waiting=self.waiting,
                free_slots=self.free_slots,
            )
            part.finished = {int(np.searchsorted(rows, r)): v for r, v in self.finished.items() if owner[r] == f}
            part.top = {int(np.searchsorted(rows, r)): v for r, v in self.top.items() if owner[r] == f}
            parts[f] = part
        return parts


class MetricsText(msgspec.Struct, tag=True):
    token: int
    text: bytes


class Drained(msgspec.Struct, tag=True):
    """Sent to every frontend once the core, draining, has no request left from any of them (after their last
    outputs): a frontend may stop listening then, not when only its own requests are done (another frontend still
    draining shares the listening socket, and connections this one accepted would be closed unanswered)."""


FromCore = Ready | Failed | CoreOutput | MetricsText | Drained

encode = msgspec.msgpack.Encoder().encode
# a frontend sends what it has for the core at the end of its event loop's turn, as one message: a list (a burst of
# submissions costs one zmq message, and one wake-up of each side's I/O thread, not one per request)
decode_to_core = msgspec.msgpack.Decoder(list[ToCore]).decode
decode_from_core = msgspec.msgpack.Decoder(FromCore).decode
