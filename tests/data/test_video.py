"""Video frame sampling and decoding: written mp4s of a moving bar, frame directories, corrupt files."""
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mindspeed_vita.data import video as video_module
from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.images import normalize, pad_to_square
from mindspeed_vita.data.video import (
    frame_dir_indices,
    list_frame_files,
    load_video_frames,
    sample_frame_indices,
    sampled_frame_count,
)

WIDTH, HEIGHT, FPS, N_FRAMES = 96, 48, 24, 72  # 3 seconds


def bar_frame(index):
    """Frame `index`: a red bar whose left edge is at x = index (so each frame is identifiable)."""
    pixels = np.full((HEIGHT, WIDTH, 3), 30, np.uint8)
    pixels[8:40, index:index + 8] = (230, 30, 30)
    return pixels


def write_mp4(path, codec, *, gop=8, faststart=False, container_format=None):
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format=container_format, options=options) as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = gop
        for index in range(N_FRAMES):
            for packet in stream.encode(av.VideoFrame.from_ndarray(bar_frame(index), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def decode_everything(path):
    """Reference: every frame, decoded front to back."""
    with av.open(path) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


def expected_tensor(images, size):
    return torch.stack([normalize(pad_to_square(image), size) for image in images])


def reference_indices(n_frames, fps, max_num_frame, max_fps=1.0):
    step = max(fps / max_fps, n_frames / (max_num_frame + 1))
    return [int(i * step) for i in range(max_num_frame) if int(i * step) < n_frames]


def test_sample_frame_indices_examples():
    # 10 s at 30 fps, 1 fps cap: one frame per second, fewer than N
    assert sample_frame_indices(300, 30.0, max_num_frame=16) == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270]
    # 100 s at 30 fps with N = 16: spread over the video, step n / (N + 1)
    assert sample_frame_indices(3000, 30.0, max_num_frame=16) == [int(i * 3000 / 17) for i in range(16)]
    # shorter than one second: only frame 0, never an index past the end
    assert sample_frame_indices(10, 30.0, max_num_frame=8) == [0]
    assert sample_frame_indices(0, 30.0, max_num_frame=8) == []
    # a source slower than max_fps repeats frames, as in the reference rule
    assert sample_frame_indices(4, 0.5, max_num_frame=6) == [0, 0, 1, 1, 2, 2]  # step 4 / 7
    with pytest.raises(ValueError):
        sample_frame_indices(10, 0.0, max_num_frame=4)
    with pytest.raises(ValueError):
        sample_frame_indices(10, 30.0, max_num_frame=0)


@pytest.mark.parametrize("n_frames", [1, 7, 29, 30, 31, 100, 899, 5000, 123456])
@pytest.mark.parametrize("fps", [1.0, 12.5, 24.0, 29.97, 60.0])
@pytest.mark.parametrize("max_num_frame, max_fps", [(4, 1.0), (16, 1.0), (64, 2.0), (4096, 1.0)])
def test_sample_frame_indices_properties(n_frames, fps, max_num_frame, max_fps):
    indices = sample_frame_indices(n_frames, fps, max_num_frame=max_num_frame, max_fps=max_fps)
    assert indices == reference_indices(n_frames, fps, max_num_frame, max_fps)
    assert 1 <= len(indices) <= max_num_frame
    assert all(0 <= index < n_frames for index in indices) and indices == sorted(indices)
    assert len(indices) <= n_frames / fps * max_fps + 1  # at most max_fps frames per second


def test_frame_dir_indices():
    assert frame_dir_indices(100, max_num_frame=16) == [6 * i for i in range(16)]
    assert frame_dir_indices(5, max_num_frame=16) == [0, 1, 2, 3, 4]
    assert frame_dir_indices(40, max_num_frame=16, max_fps=0.25) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert frame_dir_indices(1, max_num_frame=16, max_fps=0.5) == [0]  # T rounds to 0: keep one frame
    assert frame_dir_indices(0, max_num_frame=16) == []
    for n in range(1, 200):
        indices = frame_dir_indices(n, max_num_frame=32)
        assert len(indices) == min(n, 32) and indices[-1] < n


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_decoded_frames_equal_full_decode_at_the_sampled_indices(tmp_path, codec):
    path = write_mp4(tmp_path / f"{codec}.mp4", codec)
    frames = decode_everything(path)
    assert len(frames) == N_FRAMES
    # the reference decode is in display order: frame k shows the bar at x = k
    for index in (0, 17, 71):
        red = np.asarray(frames[index])[24, :, 0] > 128
        assert abs(int(np.argmax(red)) - index) <= 1

    for max_num_frame, max_fps in [(8, 1.0), (8, 4.0), (5, 24.0), (100, 24.0)]:
        indices = sample_frame_indices(N_FRAMES, FPS, max_num_frame=max_num_frame, max_fps=max_fps)
        out = load_video_frames(path, max_num_frame=max_num_frame, max_fps=max_fps, frame_size=64)
        assert out.shape == (len(indices), 3, 64, 64) and out.dtype == torch.float32
        assert torch.equal(out, expected_tensor([frames[i] for i in indices], 64)), (max_num_frame, max_fps)


@pytest.mark.parametrize("container_format, codec, suffix", [
    ("h264", "libx264", "h264"),  # raw stream: packets carry no timestamps -> decode in order, stop early
    ("matroska", "mpeg4", "mkv"),  # no frame count in the header
    ("avi", "mpeg4", "avi"),
])
def test_other_containers_decode_the_same_frames(tmp_path, container_format, codec, suffix):
    path = write_mp4(tmp_path / f"clip.{suffix}", codec, container_format=container_format)
    frames = decode_everything(path)
    with av.open(path) as container:
        fps = float(container.streams.video[0].average_rate)  # raw h264 has no timing: FFmpeg guesses
    indices = sample_frame_indices(N_FRAMES, fps, max_num_frame=6, max_fps=4.0)
    out = load_video_frames(path, max_num_frame=6, max_fps=4.0, frame_size=32)
    assert len(frames) == N_FRAMES and len(indices) == 6
    assert torch.equal(out, expected_tensor([frames[i] for i in indices], 32))


def test_in_order_fallback_stops_after_the_last_sampled_frame(tmp_path):
    path = write_mp4(tmp_path / "raw.h264", "libx264", container_format="h264")
    with av.open(path) as container:
        frame_pts, _ = video_module._index_packets(container, container.streams.video[0], path)
    assert frame_pts == [None] * N_FRAMES
    with av.open(path) as container:
        stream = container.streams.video[0]
        images, decoded = video_module._decode_in_order(container, stream, [0, 5, 5, 20], lambda im: im, path)
    assert sorted(images) == [0, 5, 20] and decoded == 21


def test_only_sampled_frames_are_decoded(tmp_path):
    path = write_mp4(tmp_path / "sparse.mp4", "mpeg4", gop=6)
    with av.open(path) as container:
        stream = container.streams.video[0]
        frame_pts, keyframe_pts = video_module._index_packets(container, stream, path)
        targets = [frame_pts[i] for i in (0, 30, 60)]
        images, decoded = video_module._decode_at(container, stream, targets, keyframe_pts, lambda im: im, path)
    assert sorted(images) == targets
    assert decoded <= 3 * 6  # at most one GOP per target, not the 61 frames up to the last
    full = decode_everything(path)
    for index, pts in zip((0, 30, 60), targets):
        assert np.array_equal(np.asarray(images[pts]), np.asarray(full[index]))


def test_frames_are_letterboxed_with_the_mean_colour(tmp_path):
    path = write_mp4(tmp_path / "wide.mp4", "mpeg4")
    out = load_video_frames(path, max_num_frame=2, frame_size=96)
    mean_colour = normalize(Image.new("RGB", (96, 96), (123, 116, 103)), 96)
    # a 96 x 48 frame is padded to 96 x 96: rows 0..23 and 72..95 are padding
    torch.testing.assert_close(out[:, :, :20], mean_colour[:, :20].expand(2, -1, -1, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, :, 76:], mean_colour[:, 76:].expand(2, -1, -1, -1), rtol=0, atol=1e-6)
    assert (out[:, :, 30:66] - mean_colour[:, 30:66]).abs().amax() > 0.3


def test_frame_directory_in_natural_order(tmp_path):
    directory = tmp_path / "frames"
    directory.mkdir()
    for number in range(1, 13):  # 1.png .. 12.png: lexicographic order would put 10 before 2
        Image.fromarray(bar_frame(number * 5)).save(directory / f"{number}.png")
    (directory / "notes.txt").write_text("not a frame")
    assert [os.path.basename(p) for p in list_frame_files(str(directory))] == [f"{n}.png" for n in range(1, 13)]
    out = load_video_frames(str(directory), max_num_frame=4, frame_size=48)
    indices = frame_dir_indices(12, max_num_frame=4)
    assert indices == [0, 3, 6, 9]
    expected = expected_tensor([Image.fromarray(bar_frame((i + 1) * 5)) for i in indices], 48)
    assert torch.equal(out, expected)


def test_truncated_and_corrupt_videos_are_rejected(tmp_path):
    good_end = write_mp4(tmp_path / "moov_at_end.mp4", "mpeg4")
    good_front = write_mp4(tmp_path / "moov_at_front.mp4", "mpeg4", faststart=True)
    cases = []
    for source, fraction in [(good_end, 0.5), (good_front, 0.6), (good_front, 0.3)]:
        data = open(source, "rb").read()
        truncated = tmp_path / f"cut_{fraction}_{os.path.basename(source)}"
        truncated.write_bytes(data[: int(len(data) * fraction)])
        cases.append(str(truncated))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(4096))
    cases.append(str(garbage))
    for path in cases:
        with pytest.raises(DataError) as caught:
            load_video_frames(path, max_num_frame=8)
        assert caught.value.reason == "corrupt_video", path
        assert str(caught.value).startswith(path)
    with pytest.raises(DataError, match="truncated: header says 72 frames"):
        load_video_frames(cases[1], max_num_frame=8)


def test_missing_and_empty_and_corrupt_frame_directories(tmp_path):
    with pytest.raises(DataError) as caught:
        load_video_frames(str(tmp_path / "nope.mp4"), max_num_frame=4)
    assert caught.value.reason == "missing_file"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as caught:
        load_video_frames(str(empty), max_num_frame=4)
    assert caught.value.reason == "missing_file"
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(bar_frame(0)).save(broken / "1.png")
    (broken / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as caught:
        load_video_frames(str(broken), max_num_frame=4)
    assert caught.value.reason == "corrupt_video" and "2.png" in str(caught.value)


def test_sampled_frame_count_predicts_the_loader_without_decoding(tmp_path):
    paths = [write_mp4(tmp_path / "a.mp4", "mpeg4"), write_mp4(tmp_path / "b.h264", "libx264", container_format="h264")]
    directory = tmp_path / "frames"
    directory.mkdir()
    for number in range(1, 8):
        Image.fromarray(bar_frame(number)).save(directory / f"{number}.png")
    paths.append(str(directory))
    for path in paths:
        for max_num_frame, max_fps in [(4, 1.0), (8, 4.0), (100, 24.0)]:
            count = sampled_frame_count(path, max_num_frame=max_num_frame, max_fps=max_fps)
            loaded = load_video_frames(path, max_num_frame=max_num_frame, max_fps=max_fps, frame_size=16)
            assert count == loaded.shape[0], (path, max_num_frame, max_fps)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00" * 1000)
    with pytest.raises(DataError) as caught:
        sampled_frame_count(str(garbage), max_num_frame=4)
    assert caught.value.reason == "corrupt_video"
    with pytest.raises(DataError) as caught:
        sampled_frame_count(str(tmp_path / "nope"), max_num_frame=4)
    assert caught.value.reason == "missing_file"
