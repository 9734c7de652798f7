"""Atomic, verified ``torch.distributed.checkpoint`` (DCP) checkpoints with rotation.

A checkpoint is a directory: DCP's files (``.metadata`` and one ``.distcp`` file per process),
``metadata.json`` (the caller's JSON metadata) and ``MANIFEST.json`` (size and SHA-256 of every
other file), written last.  :func:`save` writes it to a temporary sibling directory and renames
it into place; the checkpoint it replaces becomes ``PATH.prev-1`` (older ones ``PATH.prev-2``, ...;
``keep`` of them survive), so a process killed at any moment leaves at least one complete
checkpoint, which :func:`latest` finds.  :func:`load` checks the manifest first (a truncated,
corrupted or missing file is an error naming it) and refuses non-finite values.

Trust: DCP's ``.metadata`` file is a pickle, and loading a checkpoint unpickles it, which can
run arbitrary code.  The manifest protects against accidents (a crash, a bad disk), not against
a crafted checkpoint: load only checkpoints you trust.

Every function is collective when ``torch.distributed`` is initialised (all processes call it;
they must share the file system); without a process group they run in one process.
"""

import errno
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException
from torch.distributed.tensor import DTensor

from torchrec_compress.faults import fault_point

MANIFEST = "MANIFEST.json"
METADATA = "metadata.json"
# DCP's index of the data files (a pickle): a checkpoint always has it and our metadata
DCP_METADATA = ".metadata"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20

T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupted, or holds non-finite values, or a save that failed."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def from_rank0(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its result broadcast to every process; if it raises, every
    process raises (rank 0 its own exception), rather than the others waiting forever."""
    result: Any = None
    failure: BaseException | None = None
    if _rank() == 0:
        try:
            result = compute()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            failure = e
    holder: list[Any] = [
        (result, None if failure is None else f"{type(failure).__name__}: {failure}")
    ]
    if _distributed():
        dist.broadcast_object_list(holder, src=0)
    if failure is not None:
        raise failure
    result, error = holder[0]
    if error is not None:
        raise CheckpointError(f"rank 0 failed: {error}")
    return result


def _single_process_quietly(op: Callable[..., Any], state: dict[str, Any], path: str) -> None:
    """``dcp.save`` / ``dcp.load``; in one process without a group DCP warns on every call that it
    assumes one process, which is what this module documents."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        op(state, checkpoint_id=path, no_dist=not _distributed())


def _raise_if(error: str | None) -> None:
    if error is not None:
        raise CheckpointError(error)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    """Every file under ``directory`` except the manifest, as sorted relative paths."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def _write_durably(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def previous(path: str) -> list[str]:
    """The earlier checkpoints kept beside ``path`` (``PATH.prev-1``, ``PATH.prev-2``, ...), newest first.

    Args:
        path: a checkpoint directory written by :func:`save`.

    Returns:
        The existing ``PATH.prev-N`` directories ordered by ``N``.

    Example::

        >>> previous("/no/such/checkpoint")
        []
    """
    parent, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return []
    prefix = base + ".prev-"
    numbered = [
        (int(name[len(prefix) :]), os.path.join(parent, name))
        for name in os.listdir(parent)
        if name.startswith(prefix) and name[len(prefix) :].isdigit()
    ]
    return [p for _, p in sorted(numbered)]


def _rotate_into_place(tmp: str, path: str, keep: int) -> None:
    """``path`` -> ``path.prev-1`` (earlier ones shifted up), ``tmp`` -> ``path``, then drop all but
    ``keep`` earlier ones.  At every instant ``path`` or ``path.prev-1`` is a complete checkpoint."""
    earlier = previous(path)
    for old in reversed(earlier):  # highest number first: each target is free
        number = int(old.rsplit("-", 1)[1])
        os.rename(old, f"{path}.prev-{number + 1}")
    if os.path.lexists(path):
        os.rename(path, f"{path}.prev-1")
    fault_point("save.rotated")
    os.rename(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    for old in previous(path)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _finish_on_rank0(tmp: str, path: str, metadata: Mapping[str, Any], keep: int) -> str | None:
    """Metadata, manifest (last), rotation; returns an error message instead of raising, so that
    the other processes learn about it rather than wait forever."""
    try:
        _write_durably(os.path.join(tmp, METADATA), json.dumps(metadata, indent=2, default=str))
        fault_point("save.written")
        files = {
            rel: {
                "bytes": os.path.getsize(os.path.join(tmp, rel)),
                "sha256": _sha256(os.path.join(tmp, rel)),
            }
            for rel in _files(tmp)
        }
        manifest = {"format": MANIFEST_FORMAT, "files": files}
        _write_durably(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=2))
        _fsync_dir(tmp)
        fault_point("save.manifest")
        _rotate_into_place(tmp, path, keep)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _NO_SPACE:
            return _no_space_message(path)
        return f"checkpoint {path!r}: saving failed: {e}"
    return None


# a full disk, or the user's quota used up
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _no_space_message(path: str, needed: int | None = None) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(parent).free
    need = f"; this checkpoint needs about {needed} bytes" if needed is not None else ""
    return (
        f"checkpoint {path!r}: saving failed: no space left on device ({free} bytes free on the "
        f"file system of {parent!r}{need}); the previous checkpoint is kept: free some space "
        "there (or write somewhere else) and save again"
    )


def _errors(error: BaseException) -> Iterator[BaseException]:
    """``error``, its causes and contexts, and the failures of every process that DCP's
    ``CheckpointException`` carries (as ``.failures``: rank -> (exception, traceback))."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [x for x in (e.__cause__, e.__context__) if x is not None]
        failures = getattr(e, "failures", None)
        if isinstance(failures, Mapping):
            stack += [f[0] for f in failures.values() if isinstance(f, tuple) and f]


def _ran_out_of_space(error: BaseException, directory: str, needed: int) -> bool:
    """Whether a failed DCP write ran out of disk space.  An ``OSError`` ENOSPC says so; torch's
    zip writer loses that error on a short write (``unexpected pos 704 vs 598``), so the file
    system is asked too: less room left than this process's part of the checkpoint."""
    if any(isinstance(e, OSError) and e.errno in _NO_SPACE for e in _errors(error)):
        return True
    return shutil.disk_usage(directory).free < needed


def _state_bytes(state: Mapping[str, Any]) -> int:
    """Bytes of the tensors this process holds in ``state``."""
    return sum(t.numel() * t.element_size() for _, t in _local_tensors("", state))


def _new_tmp_dir(path: str) -> str:
    """A fresh ``PATH.tmp-<id>`` beside ``path``; leftovers of killed saves are removed first."""
    parent, base = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    for name in os.listdir(parent):
        if name.startswith(base + ".tmp-"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = os.path.join(parent, f"{base}.tmp-{uuid.uuid4().hex[:12]}")
    os.makedirs(tmp)
    return tmp


def save(
    state: dict[str, Any], path: str, metadata: Mapping[str, Any] | None = None, keep: int = 1
) -> None:
    """Write ``state`` as a DCP checkpoint at ``path``, atomically (collective).

    Each process writes its shards into ``PATH.tmp-<id>``; rank 0 then writes ``metadata.json``,
    the manifest, and renames the directory into place.  The checkpoint that was at ``path``
    becomes ``PATH.prev-1``; ``keep`` earlier checkpoints are kept.

    Args:
        state: what ``torch.distributed.checkpoint.save`` takes (nested dicts of tensors,
            ``ShardedTensor`` / ``DTensor``, and picklable values).
        path: the checkpoint directory.
        metadata: JSON-able data stored with the checkpoint and returned by :func:`load`.
        keep: how many earlier checkpoints survive beside it (``PATH.prev-1`` ...).

    Raises:
        CheckpointError: when the disk is full (naming the path and the free space), or rank 0
            could not finish the save (on every process).  The previous checkpoint is kept.

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint")
        >>> save({"w": torch.ones(2)}, path, {"epoch": 0})
        >>> save({"w": torch.full((2,), 2.0)}, path, {"epoch": 1})
        >>> [os.path.basename(p) for p in previous(path)]
        ['checkpoint.prev-1']
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    tmp = from_rank0(lambda: _new_tmp_dir(path))
    fault_point("save.begin")
    try:
        _single_process_quietly(dcp.save, state, tmp)
    except (Exception, DCPCheckpointException) as e:  # DCP's is a BaseException
        # DCP raises on every process when any of them failed
        needed = _state_bytes(state)
        no_space = _ran_out_of_space(e, os.path.dirname(tmp), needed)
        message = _no_space_message(path, needed) if no_space else None
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # the space it took, and no half checkpoint
        if message is not None:
            raise CheckpointError(message) from e
        raise
    if _distributed():
        dist.barrier()
    _raise_if(from_rank0(lambda: _finish_on_rank0(tmp, path, metadata or {}, keep)))


def _check_file(path: str, rel: str, size: int, sha256: str) -> str | None:
    full = os.path.join(path, rel)
    if not os.path.isfile(full):
        return f"checkpoint {path!r}: file {rel!r} is missing"
    actual = os.path.getsize(full)
    if actual != size:
        return (
            f"checkpoint {path!r}: file {rel!r} has {actual} bytes, the manifest says "
            f"{size} (truncated or overwritten)"
        )
    if _sha256(full) != sha256:
        return f"checkpoint {path!r}: file {rel!r} is corrupted (SHA-256 differs from the manifest)"
    return None


def _verify_error(path: str) -> str | None:
    """What is wrong with the checkpoint at ``path`` (``None``: nothing), reading only the
    manifest and the files' bytes: nothing of the checkpoint is parsed before it verifies."""
    if not os.path.isdir(path):
        return f"checkpoint {path!r} does not exist"
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return (
            f"checkpoint {path!r} has no {MANIFEST}: its save did not finish, or it was written "
            "without one (by an older version)"
        )
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
        entries = [(rel, int(e["bytes"]), str(e["sha256"])) for rel, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"checkpoint {path!r}: {MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for required in (DCP_METADATA, METADATA):  # every save writes both
        if required not in files:
            return (
                f"checkpoint {path!r}: {MANIFEST} does not list {required!r}, which every "
                "checkpoint has (the manifest is damaged or was not written by this module)"
            )
    for rel, size, sha256 in sorted(entries):
        if (error := _check_file(path, rel, size, sha256)) is not None:
            return error
    unlisted = sorted(set(_files(path)) - set(files))
    if unlisted:
        return (
            f"checkpoint {path!r}: file {unlisted[0]!r} is not in {MANIFEST} (added after the "
            "save, or the manifest is damaged)"
        )
    return None


def verify(path: str) -> None:
    """Check every file of the checkpoint at ``path`` against its manifest (on rank 0; collective).

    Args:
        path: a checkpoint directory written by :func:`save`.

    Raises:
        CheckpointError: naming the checkpoint and the missing, truncated, corrupted or
            unlisted file (or the missing or damaged manifest), on every process.

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint")
        >>> save({"w": torch.ones(2)}, path)
        >>> verify(path)
        >>> os.remove(os.path.join(path, "metadata.json"))
        >>> verify(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        torchrec_compress.checkpoint.CheckpointError: checkpoint '...': file 'metadata.json' is missing
    """
    _raise_if(from_rank0(lambda: _verify_error(path)))


def verify_local(path: str) -> None:
    """:func:`verify` on this process alone (not collective): for reads that are local.

    Raises:
        CheckpointError: as :func:`verify`.
    """
    _raise_if(_verify_error(path))


def latest(path: str) -> str | None:
    """The newest complete checkpoint among ``path`` and its kept predecessors (collective).

    After a crash during :func:`save` this is ``path`` or, if the crash came between the two
    renames, ``PATH.prev-1``.

    Args:
        path: a checkpoint directory written by :func:`save`.

    Returns:
        The first of ``path``, ``PATH.prev-1``, ... that verifies, or ``None``.

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint")
        >>> latest(path) is None
        True
        >>> save({"w": torch.ones(2)}, path)
        >>> latest(path) == path
        True
    """

    def first_good() -> str | None:
        for candidate in [path, *previous(path)]:
            if _verify_error(candidate) is None:
                return candidate
        return None

    return from_rank0(first_good)


def read_metadata(path: str) -> dict[str, Any]:
    """The ``metadata`` dict :func:`save` stored in the checkpoint at ``path`` (no verification).

    Args:
        path: a checkpoint directory written by :func:`save`.

    Returns:
        The metadata, ``{}`` if the checkpoint has none.

    Raises:
        CheckpointError: ``metadata.json`` is not a JSON object (truncated, overwritten).

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint")
        >>> save({"w": torch.ones(2)}, path, {"epoch": 3})
        >>> read_metadata(path)
        {'epoch': 3}
    """
    meta_path = os.path.join(path, METADATA)
    if not os.path.exists(meta_path):
        return {}
    try:
        with open(meta_path, "rb") as f:
            data = json.loads(f.read())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(
            f"checkpoint {path!r}: {METADATA} is not valid JSON ({e}); verify() names the "
            "damaged file of a checkpoint with a manifest"
        ) from e
    if not isinstance(data, dict):
        raise CheckpointError(
            f"checkpoint {path!r}: {METADATA} holds a {type(data).__name__}, not a JSON object"
        )
    return data


def _local_tensors(key: str, value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of every tensor this process holds in a (nested) state value."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _local_tensors(f"{key}.{k}" if key else str(k), v)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _local_tensors(f"{key}.{i}", v)
    elif isinstance(value, ShardedTensor):
        for shard in value.local_shards():
            yield key, shard.tensor
    elif isinstance(value, DTensor):
        yield key, value.to_local()
    elif isinstance(value, torch.Tensor):
        yield key, value


def non_finite_keys(state: Mapping[str, Any]) -> list[str]:
    """Keys of the floating-point tensors in ``state`` (this process's shards) holding NaN or inf.

    Args:
        state: a (nested) state dict.

    Returns:
        The dotted keys, sorted.

    Example::

        >>> non_finite_keys({"model": {"w": torch.tensor([1.0, float("nan")]), "n": torch.ones(1)}})
        ['model.w']
    """
    bad = {
        key
        for key, tensor in _local_tensors("", state)
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all())
    }
    return sorted(bad)


def load(
    state: dict[str, Any], path: str, verify_files: bool = True, check_finite: bool = True
) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``state`` in place, resharding as needed (collective).

    DCP fills the tensors of ``state`` (e.g. ``{"model": model.state_dict()}``); the caller then
    hands them to ``load_state_dict``.  Loading unpickles DCP's ``.metadata``: trusted
    checkpoints only.

    Args:
        state: the state to fill; its keys and tensor shapes select what is read.
        path: a checkpoint directory written by :func:`save`.
        verify_files: check the manifest first (see :func:`verify`).
        check_finite: refuse NaN / inf in any floating-point tensor loaded.

    Returns:
        The metadata stored with the checkpoint.

    Raises:
        CheckpointError: on a missing, truncated or corrupted file, or non-finite values
            (naming the file or the tensors), on every process.

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint")
        >>> save({"w": torch.ones(2)}, path, {"epoch": 0})
        >>> state = {"w": torch.zeros(2)}
        >>> load(state, path)
        {'epoch': 0}
        >>> state["w"]
        tensor([1., 1.])
    """
    if verify_files:
        verify(path)
    elif not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    _single_process_quietly(dcp.load, state, path)
    if check_finite:
        bad = non_finite_keys(state)
        if _distributed():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, bad)
            bad = sorted({key for keys in gathered for key in keys})
        if bad:
            raise CheckpointError(
                f"checkpoint {path!r}: non-finite values (NaN or inf) in {', '.join(bad[:10])}"
                f"{' ...' if len(bad) > 10 else ''}; refusing to load it"
            )
    return read_metadata(path)
