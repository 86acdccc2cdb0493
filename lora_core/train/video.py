"""Video training data (Wan 2.1 / 2.2): in a dataset folder, each **sub-folder of frames** (sorted images) and each
**short clip** (.mp4 / .webm / .mov / .mkv / .avi, decoded with PyAV, which ComfyUI itself requires) is one video
sample; its caption is the same-name .txt beside it (`clip1/` -> `clip1.txt`, `walk.mp4` -> `walk.txt`). Loose
images in the same folder stay image samples (a video model trains them as one-frame videos).

* **frames**: each video sample has `frames` frames, the first ones of the clip (musubi-tuner's default frame
  extraction, "head"). Wan's VAE compresses time 4x after the first frame, so a video needs 4k + 1 frames (1, 5,
  9, ..., 81); -1 takes every frame of each video, cut to the largest 4k + 1 (up to MAX_FRAMES). A video with
  fewer frames than asked is refused with its name and count. 0 (the default) is an image dataset, as before:
  sub-folders and clips are not read (a folder with videos and no images is refused, naming `frames`).
* **buckets**: a video's bucket is chosen from its first frame's size exactly as an image's (lora_core.train.
  dataset.choose_bucket: kohya's aspect-ratio buckets of about resolution^2 pixels), and every frame is fitted to
  it. Batches come from one bucket and one frame count (dataset.Sample.batch_key), deterministic given the seed.

A video sample's `image` is (3, frames, H, W) in [0, 1]; the VAE input of the backend encodes it to a (C, T, h, w)
latent (T = (frames - 1) / 4 + 1 for Wan). Pure torch / PIL / av; no ComfyUI.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from lora_core.errors import LoraFileError, LoraValueError

from .dataset import (IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, CaptionOptions, Sample, TrainDataset, _bucket_list,
                      choose_bucket, fit_to_bucket, read_caption)

log = logging.getLogger("lora_core.train")

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi")
MAX_FRAMES = 257           # frames=-1 never reads more than this from one video (Wan trains 81 at most)
TEMPORAL_STRIDE = 4        # Wan's VAE: 4k + 1 frames -> k + 1 latent frames


EVERY_FRAME = -1


def check_frames(frames: int) -> int:
    """`frames` is -1 (every frame, cut to 4k + 1) or a positive 4k + 1; else a clear error."""
    if not isinstance(frames, int) or not (frames == EVERY_FRAME or (frames >= 1 and
                                                                     (frames - 1) % TEMPORAL_STRIDE == 0)):
        raise LoraValueError(f"frames {frames!r}: a video sample needs 4k + 1 frames (1, 5, 9, 13, 17, ..., 81) for "
                             f"Wan's VAE, or -1 for every frame of each video (cut to 4k + 1).")
    return frames


def frames_for(count: int) -> int:
    """The largest 4k + 1 <= count (and <= MAX_FRAMES)."""
    count = min(count, MAX_FRAMES)
    return (count - 1) // TEMPORAL_STRIDE * TEMPORAL_STRIDE + 1 if count >= 1 else 0


def video_entries(folder: str) -> list[str]:
    """The video samples of `folder`: sub-folders holding images, and clip files, sorted by name."""
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            if any(n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".") for n in os.listdir(path)):
                found.append(path)
        elif name.lower().endswith(VIDEO_EXTENSIONS):
            found.append(path)
    return found


def has_videos(folder: str) -> bool:
    return bool(video_entries(folder))


def _frame_files(path: str) -> list[str]:
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    return [os.path.join(path, n) for n in names]


def read_frames(path: str, limit: int, fit=None) -> list:
    """The frames of a frames folder or a clip, at most `limit` of them (the first ones): PIL images (RGB), or
    what `fit(image)` makes of each as it is read (so a long clip is never held at full size)."""
    from PIL import Image

    fit = fit or (lambda image: image)
    if os.path.isdir(path):
        frames = []
        for file in _frame_files(path)[:limit]:
            with Image.open(file) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise LoraFileError(f"Video frame {file} is {img.width}x{img.height} pixels, too large to train "
                                        f"on. Downscale the frames.")
                frames.append(fit(img.convert("RGB")))
        return frames
    try:
        import av
    except ImportError:  # pragma: no cover - ComfyUI requires av
        raise LoraFileError(f"{path}: reading video clips needs PyAV (`pip install av`); or give the video as a "
                            f"sub-folder of frames (sorted images).") from None
    frames = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise LoraFileError(f"{path} has no video stream.")
            for frame in container.decode(video=0):
                if frame.width * frame.height > MAX_IMAGE_PIXELS:
                    raise LoraFileError(f"Video clip {path} is {frame.width}x{frame.height} pixels, too large to "
                                        f"train on. Downscale it.")
                frames.append(fit(frame.to_image().convert("RGB")))
                if len(frames) >= limit:
                    break
    except LoraFileError:
        raise
    except Exception as error:   # av.error.* (unreadable, unknown codec, ...)
        raise LoraFileError(f"Video clip {path} cannot be read ({type(error).__name__}: {error}). Re-encode it "
                            f"(H.264 .mp4 or VP9 .webm) or give it as a sub-folder of frames.") from None
    return frames


def load_video(path: str, frames: int, resolution: int, bucketing: bool, bucket_step: int, min_bucket: int,
               max_bucket: int) -> tuple[torch.Tensor, tuple]:
    """(3, F, H, W) in [0, 1], fitted to the bucket of its first frame, and the original (w, h)."""
    wanted = check_frames(frames)
    every = wanted == EVERY_FRAME
    first: dict = {}

    def fit(image):
        if not first:   # the bucket is the first frame's
            first["size"] = image.size
            first["bucket"] = choose_bucket(image.width, image.height, resolution, bucketing, bucket_step,
                                            min_bucket, max_bucket)
        if image.size != first["size"]:
            raise LoraFileError(f"Video {path}: frames have different sizes ({first['size'][0]}x{first['size'][1]} "
                                f"and {image.width}x{image.height}). Give every frame the same size.")
        return fit_to_bucket(image, first["bucket"])

    pictures = read_frames(path, MAX_FRAMES if every else wanted, fit)
    if not pictures:
        raise LoraFileError(f"Video {path} has no frames.")
    count = frames_for(len(pictures)) if every else wanted
    if len(pictures) < count:
        raise LoraFileError(f"Video {path} has {len(pictures)} frame(s), fewer than frames={wanted}. Lower `frames` "
                            f"(4k + 1: e.g. {frames_for(len(pictures))}), use -1 for each video's own length, or "
                            f"remove the video.")
    return torch.stack(pictures[:count], dim=1), first["size"]


def load_video_folder(folder: str, frames: int = EVERY_FRAME, resolution: int = 512, repeats: int = 1, bucketing: bool = True,
                      bucket_step: int = 64, min_bucket: int = 256, max_bucket: int = 1024,
                      missing_caption: str = "error", default_caption: str = "",
                      captions: Optional[CaptionOptions] = None) -> TrainDataset:
    """A TrainDataset of the folder's videos (frames sub-folders and clips) and loose images."""
    from .dataset import load_folder

    check_frames(frames)
    samples, missing = [], []
    for path in video_entries(folder):
        caption = read_caption(path, missing_caption, default_caption)
        if caption is None:
            missing.append(os.path.basename(path))
            continue
        video, size = load_video(path, frames, resolution, bucketing, bucket_step, min_bucket, max_bucket)
        samples.append(Sample(caption, image=video, source=path, original_size=size))
    if missing:
        raise LoraFileError(f"Dataset folder {folder}: {len(missing)} video(s) have no caption file, e.g. "
                            f"{missing[:5]} (expected e.g. {missing[0].rsplit('.', 1)[0]}.txt beside it). Add the "
                            f".txt files or set the missing-caption policy.")
    loose = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    if loose:   # the folder's own images, as image samples
        images = load_folder(folder, resolution=resolution, repeats=repeats, bucketing=bucketing,
                             bucket_step=bucket_step, min_bucket=min_bucket, max_bucket=max_bucket,
                             missing_caption=missing_caption, default_caption=default_caption, captions=captions,
                             videos=False)
        samples += images.samples
    return TrainDataset(samples, repeats=repeats, captions=captions or CaptionOptions(), resolution=resolution,
                        buckets=_bucket_list(resolution, bucketing, bucket_step, min_bucket, max_bucket))


def from_videos(videos, captions, frames: int = EVERY_FRAME, resolution: int = 512, repeats: int = 1, bucketing: bool = True,
                bucket_step: int = 64, min_bucket: int = 256, max_bucket: int = 1024,
                caption_options: Optional[CaptionOptions] = None) -> TrainDataset:
    """A TrainDataset from (3, F, H, W) [0, 1] video tensors (a ComfyUI IMAGE batch of frames, moved to channels
    first), one caption each (or one for all); frames cut to `frames` (-1: 4k + 1) and fitted to their bucket."""
    from .dataset import tensor_to_bucket

    check_frames(frames)
    if len(captions) == 1 and len(videos) > 1:
        captions = list(captions) * len(videos)
    if len(captions) != len(videos):
        raise LoraValueError(f"{len(videos)} videos but {len(captions)} captions: give one caption per video or one "
                             f"for all.")
    samples = []
    for i, (video, caption) in enumerate(zip(videos, captions)):
        count = frames_for(video.shape[1]) if frames == EVERY_FRAME else frames
        if video.shape[1] < count:
            raise LoraValueError(f"video {i} has {video.shape[1]} frames, fewer than frames={frames}.")
        _, _, h, w = video.shape
        bucket = choose_bucket(w, h, resolution, bucketing, bucket_step, min_bucket, max_bucket)
        fitted = torch.stack([tensor_to_bucket(video[:, f].float(), bucket) for f in range(count)], dim=1)
        samples.append(Sample(caption, image=fitted, source=f"video {i}", original_size=(w, h)))
    return TrainDataset(samples, repeats=repeats, captions=caption_options or CaptionOptions(), resolution=resolution,
                        buckets=_bucket_list(resolution, bucketing, bucket_step, min_bucket, max_bucket))


def is_video(sample: Sample) -> bool:
    return sample.image is not None and sample.image.ndim == 4


def ignored_videos(folder: str) -> list[str]:
    """An image dataset (frames 0) does not read videos: the ones it leaves out, or a clear error when the folder
    has videos and no images (the user meant a video dataset)."""
    found = video_entries(folder)
    if not found:
        return []
    images = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    names = [os.path.basename(p) for p in found]
    if not images:
        raise LoraValueError(f"Dataset folder {folder} has {len(found)} video(s) ({', '.join(names[:3])}"
                             f"{', ...' if len(names) > 3 else ''}) and no images: set `frames` to the frames per "
                             f"video sample (4k + 1, e.g. 17 or 81; -1 = every frame) to train on them.")
    log.warning("LoRA Core dataset: %s: %d video(s) (%s) are not read with frames 0 (an image dataset); set frames "
                "to train them", folder, len(found), ", ".join(names[:3]))
    return found
