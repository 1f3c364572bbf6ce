"""Quantized weights kept on disk, so that the second load of a model with the same quantize choice reads
them instead of quantizing again (minutes at 7B on a CPU).

What is kept: the quantized Linears only (the LLM's decoder layers and the depth transformer), in the
libraries' own serialised form (torchao's safetensors flattening for int8, bitsandbytes' packed
`state_dict` for 4-bit, weight_quantization.py says how). Everything else still comes from the
checkpoint. One safetensors file per group of layers (an LLM decoder layer, a part of the depth
transformer), written as soon as that group is quantized, so writing holds at most one group's
copy beyond the model.

Where: the folder the caller names (`VilaUModel.load(quantized_cache=...)`): by default the user's
cache folder, ``~/.cache/vila-u/quantized`` (or under XDG_CACHE_HOME); ComfyUI's loader uses
``models/vila-u/.cache/quantized``. Inside, one entry (a sub-folder) per model folder and choice,
named after both: ``<model folder name>-<hash of its path>-<scheme>-<dtype>-<runs on>``. A newer
key replaces the entry, so a model that changed leaves no stale copy behind. Deleting the folder
(or an entry) clears it; the next quantized load writes it again.

When an entry is trusted: its `manifest.json` (written last) holds the digest of the key below,
which must equal the current one, and every file must have the size, header checksum and tensor
checksums (crc32) the manifest records; anything else is ignored (and rewritten), never loaded.
The key: the scheme, the compute dtype, what the layers run on (CPU, CUDA; the 4-bit layer choice
and layout depend on it), the torch and torchao / bitsandbytes versions (they define the packed
layout), which layers are targeted, and the checkpoint: every config and index file by content
(sha256), every weight file by name, size, modification time and a sample of its content (the
first MiB and 16 blocks of 64 KiB spread over the file). Hashing the whole weight files would read
the 14 GB checkpoint at every load, more than a bf16 load costs; a file replaced by one of the same
size, time and sampled bytes is not a case that occurs (a fine-tune changes every block).

Written atomically: into a `.writing-*` folder beside the entry, each file synced, the manifest
last, then renamed to the entry's name, so a reader sees a whole entry or none. A folder that cannot
be written (read-only, disk full) costs one warning per folder and process; the load goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import zlib
from pathlib import Path

import torch

from ..checkpoint.loading import SafetensorsFile
from ..errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = 1  # of the entries this module writes; part of the key
MANIFEST = "manifest.json"
HEAD_BYTES = 2**20  # sampled from each weight file: its start (the safetensors header)...
SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 2**16  # ...and blocks spread over the rest
LEFTOVER_AGE_S = 24 * 3600  # `.writing-*` / `.stale-*` folders older than this are from dead processes

_warned: set[str] = set()  # folders whose write failure was logged in this process
_auto: dict[str, Path | None] = {}  # {"folder": what 'auto' means} once `use_default_folder` set it


class CacheCorrupt(Exception):
    """A file of a trusted-looking entry failed its checks while being read: the load starts over without it."""


def user_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vila-u" / "quantized"


def use_default_folder(folder: str | os.PathLike | None) -> dict[str, Path | None]:
    """Make 'auto' mean `folder` (None: no cache) in this process, e.g. for a test session; returns the
    previous setting, for `restore_default_folder`."""
    previous = dict(_auto)
    _auto["folder"] = None if folder is None else Path(folder)
    return previous


def restore_default_folder(previous: dict[str, Path | None]) -> None:
    _auto.clear()
    _auto.update(previous)


def resolve_folder(folder: str | os.PathLike | None) -> Path | None:
    """'auto' -> the user's cache folder (or what `use_default_folder` set); None -> no cache;
    anything else -> that folder."""
    if folder is None:
        return None
    if str(folder) == "auto":
        return _auto["folder"] if "folder" in _auto else user_folder()
    return Path(folder).expanduser()


def checkpoint_fingerprint(root: Path, folders: list[Path]) -> dict[str, list]:
    """{file relative to root: [size, mtime_ns, sampled digest]} of the weight files in `folders`, and
    {file: [sha256 of its content]} of their json files (configs, indexes)."""
    found = {}
    for folder in folders:
        for path in sorted(Path(folder).iterdir()):
            name = os.path.relpath(path, root)
            if path.suffix == ".json" and path.is_file():
                found[name] = [hashlib.sha256(path.read_bytes()).hexdigest()]
            elif path.suffix == ".safetensors" and path.is_file():
                stat = path.stat()
                found[name] = [stat.st_size, stat.st_mtime_ns, _sampled_digest(path, stat.st_size)]
    config = root / "config.json"
    if config.is_file():
        found["config.json"] = [hashlib.sha256(config.read_bytes()).hexdigest()]
    return found


def _sampled_digest(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        digest.update(file.read(HEAD_BYTES))
        for i in range(SAMPLE_BLOCKS):
            file.seek(HEAD_BYTES + (size - HEAD_BYTES) * i // SAMPLE_BLOCKS if size > HEAD_BYTES else size)
            digest.update(file.read(SAMPLE_BYTES))
    return digest.hexdigest()


def entry_name(model_folder: Path, scheme: str, dtype: torch.dtype, runs_on: str) -> str:
    """The entry of one model folder and choice: a newer key for it replaces the old one."""
    resolved = str(Path(model_folder).resolve())
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(resolved).name)[:60]
    where = hashlib.sha256(resolved.encode()).hexdigest()[:8]
    return f"{safe}-{where}-{scheme}-{str(dtype).removeprefix('torch.')}-{runs_on}"


class QuantizedCache:
    """One entry: read when it is there and current (`reading`), else written layer group by layer group
    while the model is quantized and committed at the end of the load (`commit`)."""

    def __init__(self, folder: Path, name: str, key: dict):
        self.folder, self.entry = folder, folder / name
        self.key = key
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.reading = False
        self._files: dict[str, SafetensorsFile] = {}
        self._manifest: dict = {}
        self._writing: Path | None = None  # the `.writing-*` folder, once the first group is written
        self._write_off = False  # after a failure: quantize on, write nothing
        self._pending: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}  # the open group's layers
        self._group: str | None = None
        self._written: dict = {"files": {}, "layers": {}, "kept": []}

    @classmethod
    def open(cls, folder: Path, name: str, key: dict) -> QuantizedCache:
        cache = cls(folder, name, key)
        cache.reading = cache._open_entry()
        return cache

    # ---- reading -------------------------------------------------------------------------

    def _open_entry(self) -> bool:
        path = self.entry / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):  # no entry (yet)
            return False
        except (OSError, ValueError) as error:
            return self._ignore(f"its manifest cannot be read ({error})")
        if not isinstance(manifest, dict) or manifest.get("digest") != self.digest:
            log.info("VILA-U: the quantized copy in %s is for another checkpoint or version; writing a new one",
                     self.entry)
            return False
        try:
            if not isinstance(manifest.get("layers"), dict) or not isinstance(manifest.get("kept"), list):
                raise ValueError("its manifest lacks the list of layers")
            for file_name, expected in manifest["files"].items():
                self._open_file(file_name, expected)
        except (KeyError, TypeError, ValueError, OSError, CheckpointError) as error:
            self.close()
            return self._ignore(str(error))
        self._manifest = manifest
        return True

    def _open_file(self, file_name: str, expected: dict) -> None:
        path = self.entry / file_name
        size = path.stat().st_size
        if size != expected["size"]:
            raise ValueError(f"{file_name} has {size} bytes, the manifest says {expected['size']} (truncated?)")
        handle = SafetensorsFile(path)
        self._files[file_name] = handle
        if handle.header_crc32 != expected["header_crc32"]:
            raise ValueError(f"{file_name}'s header does not match its checksum")

    def _ignore(self, reason: str) -> bool:
        log.warning("VILA-U: ignoring the quantized copy in %s: %s; quantizing again and rewriting it",
                    self.entry, reason)
        return False

    def kept(self, name: str) -> bool:
        """Whether the entry's load kept this targeted layer unquantized (its kernels could not take it)."""
        return name in self._manifest["kept"]

    def layer(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """A layer's tensors (keys as written) and its metadata, checked against their checksums; None when
        the entry has no such layer."""
        entry = self._manifest["layers"].get(name)
        if entry is None:
            return None
        try:
            handle = self._files[entry["file"]]
            tensors = {}
            for key, crc in entry["tensors"].items():
                tensor = handle.read(key)
                if _crc32(tensor) != crc:
                    raise ValueError(f"tensor {key!r} in {entry['file']} does not match its checksum")
                tensors[key] = tensor
            metadata = json.loads(handle.metadata.get(name, "{}"))
        except (KeyError, TypeError, ValueError, OSError, CheckpointError) as error:
            raise CacheCorrupt(f"{self.entry}: {error}") from error
        return tensors, metadata

    def discard(self) -> None:
        """After a failed check: forget the entry (it is rewritten by this load) and stop reading it."""
        self.close()
        self.reading, self._manifest = False, {}

    # ---- writing -------------------------------------------------------------------------

    def add(self, group: str, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """A quantized layer's serialised tensors, written with the rest of its group once the group is complete."""
        if self.reading or self._write_off:
            return
        if group != self._group:
            self._flush()
            self._group = group
        self._pending[name] = (tensors, metadata)

    def keep(self, name: str) -> None:
        if not self.reading:
            self._written["kept"].append(name)

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending or self._write_off:
            return
        try:
            self._write_group(pending)
        except (OSError, RuntimeError, ValueError) as error:  # disk full, read-only, safetensors' own errors
            self.stop_writing(error)

    def _write_group(self, pending: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]) -> None:
        from safetensors.torch import save_file

        if self._writing is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._writing = self.folder / f".writing-{self.entry.name}-{uuid.uuid4().hex[:12]}"
            self._writing.mkdir()
        file_name = f"{len(self._written['files']):04d}.safetensors"
        tensors, metadata, seen = {}, {}, set()
        for name, (layer_tensors, layer_metadata) in pending.items():
            crcs = {}
            for key, tensor in layer_tensors.items():
                tensor = tensor.detach().to("cpu").contiguous()
                if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors sharing memory
                    tensor = tensor.clone()
                seen.add(tensor.untyped_storage().data_ptr())
                tensors[key], crcs[key] = tensor, _crc32(tensor)
            if layer_metadata:
                metadata[name] = json.dumps(layer_metadata)
            self._written["layers"][name] = {"file": file_name, "tensors": crcs}
        path = self._writing / file_name
        save_file(tensors, str(path), metadata=metadata)
        _sync(path)
        written = SafetensorsFile(path)  # also checks that what was written parses
        written.close()
        self._written["files"][file_name] = {"size": path.stat().st_size, "header_crc32": written.header_crc32}

    def commit(self) -> None:
        """The load finished: write the manifest and put the entry in place (replacing an older one)."""
        if self.reading:
            return
        self._flush()
        if self._write_off or self._writing is None:
            return
        try:
            manifest = self._writing / MANIFEST
            manifest.write_text(json.dumps({"digest": self.digest, "key": self.key, **self._written}, indent=1),
                                encoding="utf-8")
            _sync(manifest)
            self._replace_entry()
        except OSError as error:
            self.stop_writing(error)
            return
        log.info("VILA-U: quantized weights saved in %s; the next load of this choice reads them", self.entry)
        self._writing = None

    def _replace_entry(self) -> None:
        stale = self.folder / f".stale-{self.entry.name}-{uuid.uuid4().hex[:12]}"
        if self.entry.exists():
            os.replace(self.entry, stale)
        try:
            os.replace(self._writing, self.entry)
        except OSError:  # another process put its (equal) entry there first
            shutil.rmtree(self._writing, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
        _remove_leftovers(self.folder, self.entry.name)

    def stop_writing(self, error: Exception | str) -> None:
        """Write nothing more in this load (what was written is dropped); say why once per folder and process."""
        self._write_off = True
        if self._writing is not None:
            shutil.rmtree(self._writing, ignore_errors=True)
            self._writing = None
        if str(self.folder) not in _warned:
            _warned.add(str(self.folder))
            advice = " Free disk space there or choose another folder." if isinstance(error, OSError) else ""
            log.warning("VILA-U: cannot keep quantized weights in %s (%s); loading goes on, and the next load "
                        "quantizes again.%s", self.folder, error, advice)

    def close(self) -> None:
        """Close the entry's files; drop an unfinished write (a load that failed or was not committed)."""
        for handle in self._files.values():
            handle.close()
        self._files = {}
        if self._writing is not None:
            shutil.rmtree(self._writing, ignore_errors=True)
            self._writing = None


def _crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else 0


def _sync(path: Path) -> None:
    """To the disk before the rename that publishes it: after a crash, a renamed file is whole, not zeros."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_leftovers(folder: Path, name: str) -> None:
    """`.writing-*` / `.stale-*` folders of this entry that a killed process left (older than a day)."""
    for leftover in list(folder.glob(f".writing-{name}-*")) + list(folder.glob(f".stale-{name}-*")):
        try:
            if time.time() - leftover.stat().st_mtime > LEFTOVER_AGE_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
