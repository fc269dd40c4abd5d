"""The one error type users see: a message that names the file, row or field and says what to do."""


class LorafitError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line and exits with 2."""


class Interrupted(LorafitError):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; the CLI exits with 130."""

    exit_code = 130


def describe(exc: BaseException) -> str:
    """One line for an exception from any library: 'Type: message', or, when the message is empty (a bare
    `assert` gives AssertionError()), 'Type at file:line (source line)' of the innermost frame, so that run.json
    and the console say where it stopped (issue 23: 'AssertionError: ' alone said nothing)."""
    message = str(exc).strip()
    if message:
        return f"{type(exc).__name__}: {message}"
    import traceback

    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    where = f"{_short_path(last.filename)}:{last.lineno}"
    return f"{type(exc).__name__} at {where}" + (f" ({last.line.strip()})" if last.line and last.line.strip() else "")


def _short_path(filename: str) -> str:
    """A file's path from its import root (bitsandbytes/nn/modules.py), not the machine's site-packages path."""
    import os
    import sys

    path = os.path.abspath(filename)
    roots = sorted((os.path.abspath(p) for p in sys.path if p), key=len, reverse=True)
    for root in roots:
        if path.startswith(root.rstrip(os.sep) + os.sep):
            return os.path.relpath(path, root).replace(os.sep, "/")
    return filename


def smaller_batch(batch_size: int, grad_accum_steps: int, processes: int = 1) -> str:
    """What to train with after running out of memory: half the batch, twice the accumulation steps."""
    half = batch_size // 2
    if half < 1:
        return "train again with a shorter --max-length or a smaller model (--batch-size is already 1)"
    before, after = batch_size * grad_accum_steps * processes, half * 2 * grad_accum_steps * processes
    same = f"the same global batch of {before}" if after == before else f"a global batch of {after} for {before}"
    return f"train again with --batch-size {half} --grad-accum-steps {2 * grad_accum_steps} ({same})"
