"""optserve server: optimizer math, flat layout, sessions, persistence and the HTTP layer.

Rooms, from the inside out:

- ``hyperparams``: the optimizer family, its PyTorch names, defaults and validation.
- ``reference``: one readable per-tensor formula per algorithm; the numerical oracle.
- ``fused``: the same algorithms stepping contiguous ranges of flat float32 buffers; what the server runs.
- ``layout``: ``FlatLayout``, the table name -> (offset, shape) over one buffer per state.
- ``session``: a session's buffers and the step semantics (sequencing, idempotency, non-finite policy).
- ``store`` / ``checkpoint``: where sessions live, and their one-file safetensors form.
- ``app`` / ``settings`` / ``cli``: the HTTP layer, configuration and the ``optserve`` command.
"""
