"""Video frames: which frames to take (Long-VITA's rule) and decoding only those.

A video is a file (anything FFmpeg reads) or a directory of png/jpg frames (subdirectories
included) in natural sort order. Frames are letterboxed to a square with the ImageNet mean
colour, bicubic-resized to `frame_size` and normalised; there is no tiling and each frame
becomes one visual unit.
"""
from __future__ import annotations

import bisect
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import av
import torch
from PIL import Image

from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.images import load_image, normalize, pad_to_square

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")


def sample_frame_indices(n_frames: int, fps: float, *, max_num_frame: int, max_fps: float = 1.0) -> List[int]:
    """Frame indices to take from a video file of `n_frames` frames at `fps`.

    At most `max_fps` frames per second and at most N = `max_num_frame` frames:
    ``step = max(fps / max_fps, n_frames / (N + 1))`` and frames ``int(i * step)`` for i < N,
    keeping only indices < n_frames (a short video yields fewer than N frames; when fps <
    max_fps the step can be below 1 and indices repeat, as in the reference).
    """
    _check_limits(max_num_frame, max_fps)
    if n_frames < 0 or not fps > 0:
        raise ValueError(f"need n_frames >= 0 and fps > 0, got n_frames={n_frames}, fps={fps}")
    step = max(fps / max_fps, n_frames / (max_num_frame + 1))
    indices = (int(i * step) for i in range(max_num_frame))
    return [index for index in indices if index < n_frames]


def frame_dir_indices(n_frames: int, *, max_num_frame: int, max_fps: float = 1.0) -> List[int]:
    """Frame indices to take from a directory of `n_frames` frames (source fps taken as 1).

    ``T = int(min(n_frames * max_fps, max_num_frame))`` frames at ``int(n_frames / T) * i``.
    When T rounds to 0 (fewer frames than one per 1/max_fps seconds) the first frame is taken,
    so a video never contributes zero frames.
    """
    _check_limits(max_num_frame, max_fps)
    if n_frames < 0:
        raise ValueError(f"need n_frames >= 0, got {n_frames}")
    if n_frames == 0:
        return []
    count = int(min(n_frames / 1.0 * max_fps, max_num_frame))
    if count == 0:
        return [0]
    stride = int(n_frames / count)
    return [stride * i for i in range(count)]


def load_video_frames(
    path: str, *, max_num_frame: int, max_fps: float = 1.0, frame_size: int = 448
) -> torch.Tensor:
    """Sampled, letterboxed, normalised frames of a video file or frame directory: [T, 3, S, S].

    Only the sampled frames are decoded (seek to the keyframe before each, decode forward).
    Raises DataError "missing_file" (no such path, or a directory without frames) and
    "corrupt_video" (cannot open, index or decode, or fewer frames than the header promises).
    """

    def to_unit(image: Image.Image) -> torch.Tensor:
        # NOTE: each frame shrinks to its tensor as soon as it is decoded, so thousands of
        # full-resolution frames never sit in memory together
        return normalize(pad_to_square(image), frame_size)

    if os.path.isdir(path):
        frames = _load_frame_dir(path, to_unit, max_num_frame=max_num_frame, max_fps=max_fps)
    elif os.path.isfile(path):
        frames = _load_video_file(path, to_unit, max_num_frame=max_num_frame, max_fps=max_fps)
    else:
        raise DataError("missing_file", "no such video file or frame directory", path=path)
    return torch.stack(frames)


def sampled_frame_count(path: str, *, max_num_frame: int, max_fps: float = 1.0) -> int:
    """How many frames `load_video_frames` returns for `path`, without decoding any.

    Lists a frame directory, or demuxes a file's packets (the same index the loader builds), so
    token budgets can be checked before paying for decoding. Raises the loader's DataErrors.
    """
    if os.path.isdir(path):
        files = _frame_files_or_error(path)
        return len(frame_dir_indices(len(files), max_num_frame=max_num_frame, max_fps=max_fps))
    if not os.path.isfile(path):
        raise DataError("missing_file", "no such video file or frame directory", path=path)
    try:
        with av.open(path) as container:
            _, frame_pts, _, fps = _index_video(container, path)
    except _VIDEO_READ_ERRORS as error:
        raise _unreadable(error, path) from None
    return len(sample_frame_indices(len(frame_pts), fps, max_num_frame=max_num_frame, max_fps=max_fps))


def natural_sort_key(name: str) -> Tuple:
    """Sort key that orders "frame2" before "frame10" (digit runs compare as numbers)."""
    parts = re.split(r"(\d+)", name.lower())
    return tuple(int(part) if part.isdigit() else part for part in parts)


def list_frame_files(directory: str) -> List[str]:
    """The png/jpg files of a frame directory and all its subdirectories (walked recursively,
    as the Long-VITA release does), in natural sort order of their paths below `directory`
    (so "clip2/frame9" comes before "clip10/frame1")."""
    relative = []
    for parent, _, names in os.walk(directory, followlinks=True):
        below = os.path.relpath(parent, directory)
        relative += [name if below == "." else os.path.join(below, name)
                     for name in names if name.lower().endswith(FRAME_EXTENSIONS)]
    return [os.path.join(directory, name) for name in sorted(relative, key=natural_sort_key)]


def _check_limits(max_num_frame: int, max_fps: float) -> None:
    if max_num_frame < 1 or not max_fps > 0:
        raise ValueError(f"need max_num_frame >= 1 and max_fps > 0, got {max_num_frame}, {max_fps}")


def _load_frame_dir(path: str, to_unit: Callable, *, max_num_frame: int, max_fps: float) -> List[torch.Tensor]:
    files = _frame_files_or_error(path)
    units = {}
    indices = frame_dir_indices(len(files), max_num_frame=max_num_frame, max_fps=max_fps)
    for index in sorted(set(indices)):
        try:
            units[index] = to_unit(load_image(files[index]))
        except DataError as error:
            raise DataError("corrupt_video", f"frame {index}: {error}", path=path) from None
    return [units[index] for index in indices]


def _load_video_file(path: str, to_unit: Callable, *, max_num_frame: int, max_fps: float) -> List[torch.Tensor]:
    try:
        with av.open(path) as container:
            stream, frame_pts, keyframe_pts, fps = _index_video(container, path)
            indices = sample_frame_indices(len(frame_pts), fps, max_num_frame=max_num_frame, max_fps=max_fps)
            if None not in frame_pts:
                targets = [frame_pts[index] for index in indices]
                by_pts, _ = _decode_at(container, stream, sorted(set(targets)), keyframe_pts, to_unit, path)
                return [by_pts[pts] for pts in targets]
        # no timestamps (raw elementary streams): such inputs cannot seek back either, so decode
        # from a fresh open, in order
        with av.open(path) as container:
            by_index, _ = _decode_in_order(container, container.streams.video[0], indices, to_unit, path)
            return [by_index[index] for index in indices]
    except _VIDEO_READ_ERRORS as error:
        raise _unreadable(error, path) from None


#: what PyAV raises for a file it cannot open, index or decode
_VIDEO_READ_ERRORS = (av.FFmpegError, OSError, EOFError)


def _unreadable(error: BaseException, path: str) -> DataError:
    return DataError("corrupt_video", f"cannot read video ({type(error).__name__}: {error})", path=path)


def _frame_files_or_error(directory: str) -> List[str]:
    """`list_frame_files`, or the missing_file DataError when the directory has none."""
    files = list_frame_files(directory)
    if not files:
        raise DataError("missing_file", f"frame directory has no {'/'.join(FRAME_EXTENSIONS)} files",
                        path=directory)
    return files


def _index_video(container, path: str) -> Tuple[Any, List[Optional[int]], List[int], float]:
    """(first video stream, frame pts, keyframe pts, frame rate) of an open container."""
    if not container.streams.video:
        raise DataError("corrupt_video", "no video stream", path=path)
    stream = container.streams.video[0]
    frame_pts, keyframe_pts = _index_packets(container, stream, path)
    return stream, frame_pts, keyframe_pts, _frame_rate(stream, len(frame_pts), path)


def _index_packets(container, stream, path: str) -> Tuple[List[Optional[int]], List[int]]:
    """Presentation timestamps of every frame (sorted) and of keyframes, from the packets alone.

    Demuxing reads the compressed packets without decoding them, so this is cheap; it also
    counts frames reliably where the header has no or a wrong count.
    """
    frame_pts: List[Optional[int]] = []
    keyframe_pts: List[int] = []
    for packet in container.demux(stream):
        if packet.size == 0:  # the empty packets at the end only flush the decoder
            continue
        frame_pts.append(packet.pts)
        if packet.is_keyframe and packet.pts is not None:
            keyframe_pts.append(packet.pts)
    if not frame_pts:
        raise DataError("corrupt_video", "no video frames", path=path)
    if stream.frames and len(frame_pts) < stream.frames:
        raise DataError(
            "corrupt_video", f"truncated: header says {stream.frames} frames, only {len(frame_pts)} readable", path=path
        )
    if None not in frame_pts:
        frame_pts.sort()
        keyframe_pts.sort()
    if not keyframe_pts:
        keyframe_pts = [frame_pts[0]] if frame_pts[0] is not None else []
    return frame_pts, keyframe_pts


def _frame_rate(stream, n_frames: int, path: str) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if rate:
        return float(rate)
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
        if seconds > 0:
            return n_frames / seconds
    raise DataError("corrupt_video", "unknown frame rate", path=path)


def _decode_at(
    container, stream, targets: List[int], keyframe_pts: List[int], to_unit: Callable, path: str
) -> Tuple[Dict, int]:
    """Decode the frames whose pts are `targets` (sorted, unique): ({pts: to_unit(image)}, frames decoded).

    For each target, seek to the last keyframe at or before it unless the decoder already
    stands past that keyframe (then decoding forward is cheaper than seeking back).
    """
    images: Dict[int, object] = {}
    decoded = 0
    frames = None  # the active decode iterator
    last = None  # the last frame decoded
    for target in targets:
        if last is not None and last.pts >= target:  # a gap in pts: the frame after covers it
            images[target] = to_unit(last.to_image())
            continue
        position = bisect.bisect_right(keyframe_pts, target) - 1
        keyframe = keyframe_pts[max(position, 0)]
        if frames is None or last is None or keyframe > last.pts:
            container.seek(keyframe, stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            decoded += 1
            if frame.pts is None:
                raise DataError("corrupt_video", "decoded a frame without a timestamp", path=path)
            last = frame
            if frame.pts >= target:
                images[target] = to_unit(frame.to_image())
                break
        else:
            raise DataError("corrupt_video", f"video ended before the frame at pts {target}", path=path)
    return images, decoded


def _decode_in_order(container, stream, indices: List[int], to_unit: Callable, path: str) -> Tuple[Dict, int]:
    """Fallback for packets without timestamps: decode a freshly opened container from the start,
    stopping after the last wanted index."""
    wanted = set(indices)
    images: Dict[int, object] = {}
    decoded = 0
    for index, frame in enumerate(container.decode(stream)):
        decoded += 1
        if index in wanted:
            images[index] = to_unit(frame.to_image())
            if len(images) == len(wanted):
                return images, decoded
    raise DataError("corrupt_video", f"decoded only {decoded} frames, needed frame {max(wanted)}", path=path)
