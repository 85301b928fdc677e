"""TensorBoard event files of a run: scalars and images, written by process 0 only.

A run writes ``WORKDIR/tensorboard/`` (the 3D model) and
``WORKDIR/tensorboard/slices/`` (the 2D twin trained on slices), so
``tensorboard --logdir WORKDIR/tensorboard`` shows both as two runs, and
``--logdir runs`` compares every run in ``runs/``. Files are written with
``tensorboardX`` (pure Python: protobuf and numpy); the viewer itself
(``pip install tensorboard``) is needed only to look at them.

Resuming: every start opens a new event file. A run resumed from the
checkpoint at step S replays steps S+1.. and writes them again; its new file
starts with a restart marker at step S+1 (a ``SessionLog`` START event, as
TensorFlow's writers emit after a crash), and TensorBoard's Python loader
drops the older files' points from that step on, just as ``metrics.csv``
drops its rows after S. Its faster Rust loader ignores the marker but drops a
tag's points at and after a step as soon as a later file writes that tag at
that step, which the resumed run does for every tag it writes again (the
training scalars at its first log step).
"""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping

import jax
import numpy as np

EVENT_GLOB = "events.out.tfevents.*"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> channels (grey, RGB, grey+alpha, RGBA)


class Board:
    """One TensorBoard run directory. On processes other than 0 every method does nothing.

    Args:
      logdir: the run's directory (created).
      start: the step training resumes from (0 for a fresh start). If the
        directory already holds event files, the new file marks step
        ``start + 1`` as a restart, so TensorBoard hides the older points
        from there on.
      enabled: write at all; default: only on process 0.
    """

    def __init__(self, logdir: str | Path, *, start: int = 0, enabled: bool | None = None):
        self.logdir = Path(logdir)
        self.writer = None
        if not (jax.process_index() == 0 if enabled is None else enabled):
            return
        SummaryWriter = _tensorboardx().SummaryWriter
        resumed = self.logdir.is_dir() and any(self.logdir.glob(EVENT_GLOB))
        # tensorboardX names files by the second they were opened: the suffix
        # keeps a restart within the same second from overwriting the file
        # before it, and sorts after it.
        self.writer = SummaryWriter(str(self.logdir), purge_step=start + 1 if resumed else None,
                                    filename_suffix=f".{time.time_ns()}")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Writes ``{tag: value}`` at ``step``; None values are skipped."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), int(step))

    def image(self, tag: str, image: str | Path | np.ndarray, step: int) -> None:
        """Writes an image at ``step``: a PNG file's bytes as they are, or an array.

        An array is (H, W) grey or (H, W, C) with C in 1, 3, 4: uint8 in
        [0, 255] or float in [0, 1].
        """
        if self.writer is None:
            return
        if isinstance(image, (str, Path)):
            Summary = _tensorboardx().proto.summary_pb2.Summary
            data = Path(image).read_bytes()
            height, width, channels = png_size(data, name=str(image))
            picture = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=data)
            summary = Summary(value=[Summary.Value(tag=tag, image=picture)])
            self.writer.file_writer.add_summary(summary, int(step))
            return
        array = np.asarray(image)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"image {tag!r}: expected (H, W) or (H, W, 1|3|4), got shape {array.shape}")
        self.writer.add_image(tag, array, int(step), dataformats="HW" if array.ndim == 2 else "HWC")

    def flush(self) -> None:
        """Makes everything written so far visible to a reader."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _tensorboardx():
    """The tensorboardX package, imported without PyTorch.

    Its writer module imports torch whenever torch is installed, only to
    accept torch tensors: seconds of start-up (and memory) that a JAX run
    never uses. Hiding torch during that one import makes it skip that.
    """
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    import tensorboardX
    import tensorboardX.crc32c
    import tensorboardX.proto.event_pb2
    import tensorboardX.proto.summary_pb2

    return tensorboardX


def png_size(data: bytes, *, name: str = "image") -> tuple[int, int, int]:
    """(height, width, channels) from a PNG's header; ValueError naming ``name`` if not a PNG."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError(f"{name}: not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return height, width, PNG_CHANNELS.get(data[25], 4)


def read_events(logdir: str | Path) -> Iterator:
    """The ``Event`` protos of every event file in ``logdir`` (not its subdirectories), file by file.

    Checks each record's framing (length and data CRC-32C), so a torn or
    corrupt file raises ValueError naming it; a record cut off at the end
    (a file still being written) ends that file quietly.
    """
    crc32c, Event = _tensorboardx().crc32c.crc32c, _tensorboardx().proto.event_pb2.Event

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    for path in sorted(Path(logdir).glob(EVENT_GLOB)):
        data, offset = path.read_bytes(), 0
        while offset + 12 <= len(data):
            header = data[offset:offset + 8]
            (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[offset + 8:offset + 12])
            end = offset + 12 + length + 4
            if end > len(data):
                break
            body = data[offset + 12:offset + 12 + length]
            (body_crc,) = struct.unpack("<I", data[offset + 12 + length:end])
            if masked(header) != length_crc or masked(body) != body_crc:
                raise ValueError(f"{path}: corrupt record at byte {offset}")
            yield Event.FromString(body)
            offset = end


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of ``logdir``'s scalars as TensorBoard shows them.

    A restart marker at step S (see the module docstring) drops the points of
    earlier files at steps >= S, as TensorBoard does.
    """
    out: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(logdir):
        if event.HasField("session_log") and event.session_log.status == event.session_log.START:
            out = {tag: [p for p in points if p[0] < event.step] for tag, points in out.items()}
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out
