"""What a model occupies in memory as it runs here (not estimated from parameter counts).

Peak RSS comes from the kernel's high-water mark (VmHWM). Linux lets a process reset it
(/proc/self/clear_refs, value 5), so one process can measure several model configurations in turn:
free the previous model, return freed heap to the OS (malloc_trim), reset, then run the workload.
This module imports only torch, so a process that only decodes (comptrust.serving_process) can use it.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import os

import torch


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers, plus tensors modules keep for their kernels (QuantLinear's CPU
    tiles), counting shared storage (tied embeddings) once."""
    seen, total = set(), 0
    kernel_tensors = [t for m in model.modules() if hasattr(m, "kernel_tensors") for t in m.kernel_tensors()]
    for tensor in list(model.parameters()) + list(model.buffers()) + kernel_tensors:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def copy_into_process_memory(module: torch.nn.Module) -> None:
    """Give each parameter and buffer of `module` memory of its own, in place (tied parameters stay tied).

    Why: transformers loads a safetensors model's tensors as views of the file's mapping, and the mapping lives as
    long as any one of them does, with every page ever read counted in RSS. Compress the layers and keep the
    embedding, and the dense layers' pages stay resident: measured as the compressed model's memory (the embedded
    model's int4 decode RSS read 1144 MiB from its cached safetensors against 758 from the GGUF read), and written
    to copy-on-write by any in-place update. Copied, each tensor's memory goes when it does, as after a GGUF read."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = tensor.data.clone()


def _proc_status_kib(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        with open(path) as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def available_memory_bytes() -> int | None:
    """MemAvailable: what the system can give this process without swapping; None where unknown."""
    kib = _proc_status_kib("MemAvailable", "/proc/meminfo")
    return None if kib is None else kib * 1024


def current_rss_bytes() -> int | None:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so a reset peak starts low."""
    gc.collect()
    return_freed_heap()


def return_freed_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing). Loops that build one
    layer at a time call it after each: glibc serves the few-MB temporaries of a conversion from the heap and keeps
    their pages once freed, between the layers' results, so converting the embedded model's 210 pruned layers to
    the bitmap format held 1.0 GB of RSS where the layers take 0.22 (0.36 with this after each; 2.3 ms a call)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS; False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


_MADV_RANDOM, _MADV_DONTNEED = 1, 4


def _file_mapping(address: int) -> tuple[int, int, int, str] | None:
    """(start, end, Anonymous kB, file path) of the file-backed mapping of this process holding `address`, else
    None. Its anonymous pages are the ones the process wrote (a private mapping's copy-on-write copies); a dirty
    page alone says nothing, since a file just written stays dirty in the page cache until written back."""
    try:
        with open("/proc/self/smaps") as smaps:
            found = None
            for line in smaps:
                head = line.split()
                if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
                    if found is not None:
                        return None  # it ended without an Anonymous line
                    start, end = (int(part, 16) for part in head[0].split("-"))
                    if start <= address < end and head[4] != "0" and len(head) >= 6:  # inode 0: anonymous
                        found = (start, end, line.split(maxsplit=5)[5].rstrip("\n"))
                elif found is not None and head[0] == "Anonymous:":
                    return found[0], found[1], int(head[1]), found[2]
    except OSError:
        return None
    return None


def release_mapped_file(tensor: torch.Tensor) -> int:
    """Hand back every page of the file mapping `tensor` lies in (safetensors maps a checkpoint's file once and its
    tensors are views of it): unmapped from this process and dropped from the page cache, and from then on a read
    maps the one page it touches. RSS then counts only the pages read again. Returns the bytes released; 0 where
    the tensor is not file-backed, a page of the mapping was ever written, or the OS refuses.

    Why: a checkpoint's mapping stays in RSS with every page ever read while any tensor of it lives (the embedding,
    for the whole process), though after loading most of those pages are never read again: the packed tensors the
    CPU layers were built from (their tiles are their own memory), and the fp32 embedding, which a decoder reads
    whole once, to build the int8 screen of the tied head (csrc/cpu/screened_argmax.h), and from then on a row per
    token plus the few rows the screen leaves to compute exactly. Dense layers that read their weights from the
    mapping read them again at the next token, so RSS counts them again, as it should.
    Why the page cache too: a fault maps the cached pages around the one it needs (fault-around, whole large
    folios), so with the file cached the same int4 model's decode RSS read 340-390 MiB, depending on how the cache
    had read the file; read back one page at a time (MADV_RANDOM: no read-ahead), it maps what decoding reads.

    Only mappings never written to: in a private file mapping a written page is the process's own (anonymous) copy,
    which MADV_DONTNEED would drop (the file's contents would come back), so a mapping with any is left alone.
    """
    mapping = _clean_file_mapping(tensor)
    if mapping is None:
        return 0
    start, end, path = mapping
    if not _madvise(start, end, _MADV_RANDOM) or not _madvise(start, end, _MADV_DONTNEED):
        return 0
    # Failing these, the pages are unmapped all the same; those still cached may be mapped again around the ones read.
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return end - start
    try:
        with contextlib.suppress(OSError):  # the cache drops only pages written back: flush a checkpoint just written
            os.fsync(descriptor)
        with contextlib.suppress(OSError):
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)
    return end - start


class MappedPages:
    """Unmaps from this process the whole pages of tensors read from memory-mapped files (a checkpoint's tensors that
    a loader has just turned into a layer's own form), under release_mapped_file's condition that no page of their
    mapping was ever written, checked once per mapping (reading /proc/self/smaps takes ~10 ms); the page cache keeps
    them. Create one per load: the check holds while nothing writes the tensors, as a loader does not.

    Why: while the embedding keeps the checkpoint's mapping alive, every page a loader reads stays in RSS; loading the
    embedded model's mag-50 checkpoint onto bitmap layers kept all 513 MB of its dense weights that way, on top of the
    layers it built. Pages of a tensor that is read again later come back on their own."""

    def __init__(self):
        self._spans: list[tuple[int, int]] = []  # the clean file mappings found
        self._gave_up = False
        self.released = 0  # bytes

    def release(self, tensor: torch.Tensor) -> int:
        """Unmap `tensor`'s whole pages where they lie in a clean file mapping; the bytes released."""
        if self._gave_up or tensor.device.type != "cpu" or tensor.numel() == 0:
            return 0
        first = tensor.data_ptr()
        span = next((span for span in self._spans if span[0] <= first < span[1]), None)
        if span is None:
            mapping = _clean_file_mapping(tensor)
            if mapping is None:  # a load's tensors come from one source: not mapped, or written to
                self._gave_up = True  # (and a lookup per tensor would cost more than the load)
                return 0
            span = mapping[:2]
            self._spans.append(span)
        page = mmap.PAGESIZE
        start = -(-first // page) * page  # whole pages inside the tensor only: its neighbours keep theirs
        end = min(first + tensor.numel() * tensor.element_size(), span[1]) // page * page
        if end <= start or not _madvise(start, end, _MADV_DONTNEED):
            return 0
        self.released += end - start
        return end - start


def in_clean_file_mapping(tensor: torch.Tensor) -> bool:
    """Whether `tensor` lies in a file mapping no page of which was ever written (release_mapped_file's condition:
    its pages can be unmapped and read back from the file unchanged)."""
    return _clean_file_mapping(tensor) is not None


def _clean_file_mapping(tensor: torch.Tensor) -> tuple[int, int, str] | None:
    """(start, end, path) of the file mapping holding a CPU tensor, where no page of it was ever written; else None."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return None
    mapping = _file_mapping(tensor.data_ptr())
    if mapping is None or mapping[2] != 0:
        return None
    return mapping[0], mapping[1], mapping[3]


def _madvise(start: int, end: int, advice: int) -> bool:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(start, end - start, advice) == 0
