"""Training data: an image folder with same-name .txt captions, repeats, aspect-ratio buckets and caption
augmentation (shuffle with keep-tokens, dropout). Pure torch/PIL; no ComfyUI.

Images are loaded once, resized to cover their bucket and centre-cropped, and kept as float tensors in
[0, 1] (C, H, W). With bucketing, an image is not enlarged by a bucket step or more: one that much smaller
than the bucket its aspect ratio picks gets a bucket of its own size instead (cut to the bucket step), so a LoRA
learns small images at the size they have, not blurred 8x enlargements of them (and at their cost, not 64x more
per step). Which images form each step's batch is a pure function of (seed, batch index), so a
run resumed from a state file sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from lora_core.errors import LoraFileError, LoraValueError

log = logging.getLogger("lora_core.train")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Guards against pathological inputs: captions past this are cut (with a warning), images past this are refused
# with their name (a decompression bomb would otherwise take the machine's memory).
MAX_CAPTION_CHARS = 8000
MAX_IMAGE_PIXELS = 64_000_000
CAPTION_POLICIES = ("error", "use caption widget", "use file name", "empty")


@dataclass
class Sample:
    """One training example. `image` (3, H, W) in [0, 1] and/or a ready `latent` (C, h, w); `cond` is an
    optional precomputed text-encoder output (tensor or dict of tensors) that bypasses the text encoder."""

    caption: str
    image: Optional[torch.Tensor] = None
    latent: Optional[torch.Tensor] = None
    cond: Optional[object] = None
    source: str = ""
    original_size: Optional[tuple] = None   # (w, h) of the image before fitting it to its bucket

    @property
    def bucket(self) -> tuple:
        t = self.latent if self.latent is not None else self.image
        return tuple(t.shape[-2:]) if t is not None else ()

    @property
    def batch_key(self) -> tuple:
        """What samples batched together share: the bucket, and for videos (3, F, H, W) the frame count too."""
        t = self.latent if self.latent is not None else self.image
        return tuple(t.shape[1:]) if t is not None else ()


@dataclass
class CaptionOptions:
    shuffle: bool = False
    keep_tokens: int = 0           # leading comma-separated tags kept in place when shuffling
    dropout: float = 0.0           # probability to train a sample with an empty caption
    separator: str = ","

    @property
    def random(self) -> bool:
        return self.shuffle or self.dropout > 0


@dataclass
class TrainDataset:
    samples: list[Sample]
    repeats: int = 1
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    resolution: int = 512
    buckets: list = field(default_factory=list)
    # how images were fitted to buckets (load_folder's keyword arguments), so a validation folder is fitted alike
    fit: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.samples:
            raise LoraValueError("The training dataset is empty: give at least one image.")
        if self.repeats < 1:
            raise LoraValueError(f"repeats must be >= 1, got {self.repeats}.")
        if not 0 <= self.captions.dropout <= 1:
            raise LoraValueError(f"caption dropout must be between 0 and 1, got {self.captions.dropout}.")

    def __len__(self) -> int:
        return len(self.samples) * self.repeats

    def bucket_counts(self) -> dict:
        counts: dict = {}
        for s in self.samples:
            counts[s.bucket] = counts.get(s.bucket, 0) + self.repeats
        return counts

    def size_notes(self) -> list[str]:
        """What fitting the images to buckets did that a user should know: images that got a bucket of their own
        size (rather than being enlarged) and, without bucketing, images enlarged to the square."""
        smaller, enlarged = [], []
        for s in self.samples:
            if s.original_size is None or s.image is None:
                continue
            w, h = s.original_size
            bh, bw = s.image.shape[-2:]
            if bw > w or bh > h:
                enlarged.append(max(bw / w, bh / h))
            elif self.buckets and (bw, bh) not in self.buckets:
                smaller.append(f"{bw}x{bh}")
        notes = []
        if smaller:
            sizes = ", ".join(sorted(set(smaller)))
            notes.append(f"{len(smaller)} image(s) too small for a {self.resolution} px bucket train at their own size "
                         f"({sizes}) instead of being enlarged")
        if enlarged:
            notes.append(f"{len(enlarged)} image(s) enlarged up to {max(enlarged):.1f}x to the {self.resolution} px "
                         f"square (bucketing off): the LoRA learns the enlarged, blurred versions; lower the "
                         f"resolution to train at their own size")
        return notes

    def tag_frequency(self) -> dict:
        """kohya's ss_tag_frequency: {dataset: {tag: count}}."""
        freq: dict = {}
        for s in self.samples:
            for tag in split_tags(s.caption, self.captions.separator):
                freq[tag] = freq.get(tag, 0) + self.repeats
        return {"dataset": freq}


# ------------------------------------------------------------------------------------------ captions

def split_tags(caption: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in caption.split(separator) if t.strip()]


def process_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """Apply caption dropout, then shuffle the tags after the first `keep_tokens` ones."""
    if options.dropout > 0 and rng.random() < options.dropout:
        return ""
    if not options.shuffle:
        return caption
    tags = split_tags(caption, options.separator)
    keep, rest = tags[:options.keep_tokens], tags[options.keep_tokens:]
    rng.shuffle(rest)
    return (options.separator + " ").join(keep + rest)


# ------------------------------------------------------------------------------------------ buckets

def make_buckets(resolution: int, min_size: int = 256, max_size: int = 1024, step: int = 64) -> list[tuple]:
    """kohya-style buckets: every (w, h) with sides multiple of `step` in [min_size, max_size] and
    w*h <= resolution^2, keeping for each width the largest height; the square is always in."""
    if resolution < step or resolution % 8:
        raise LoraValueError(f"resolution {resolution} must be a multiple of 8 and at least the bucket step {step}.")
    if step < 8 or step % 8:
        raise LoraValueError(f"bucket step {step} must be a multiple of 8.")
    max_area = resolution * resolution
    min_size = min(min_size, resolution)
    max_size = max(max_size, resolution)
    buckets = {(resolution, resolution)}
    width = min_size
    while width <= max_size:
        height = min(max_size, (max_area // width) // step * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple]) -> tuple:
    """The bucket whose aspect ratio is closest (log-ratio distance), ties broken by the larger area."""
    import math

    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def fit_to_bucket(image, bucket: tuple) -> torch.Tensor:
    """Resize a PIL image to cover `bucket` (w, h), centre-crop, return (3, h, w) float in [0, 1]."""
    from PIL import Image

    target_w, target_h = bucket
    scale = max(target_w / image.width, target_h / image.height)
    new_w, new_h = max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale))
    image = image.convert("RGB").resize((new_w, new_h), Image.LANCZOS)
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    image = image.crop((left, top, left + target_w, top + target_h))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(target_h, target_w, 3).permute(2, 0, 1).float() / 255.0


def tensor_to_bucket(image: torch.Tensor, bucket: tuple) -> torch.Tensor:
    """Same as `fit_to_bucket` for a (3, H, W) float tensor (bilinear, antialiased)."""
    import torch.nn.functional as F

    target_w, target_h = bucket
    _, h, w = image.shape
    scale = max(target_w / w, target_h / h)
    new_w, new_h = max(target_w, round(w * scale)), max(target_h, round(h * scale))
    if (new_h, new_w) != (h, w):
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", antialias=True,
                              align_corners=False)[0]
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    return image[:, top:top + target_h, left:left + target_w].clamp(0, 1).contiguous()


def own_size_bucket(width: int, height: int, resolution: int, step: int) -> tuple:
    """(w, h) within the image itself: its own size (scaled down to the resolution's area when larger), each
    side cut to a multiple of `step`, or of 8 px (the latent grid) for a side shorter than one step."""
    import math

    k = min(1.0, resolution / math.sqrt(width * height))
    w, h = width * k, height * k
    return tuple(max(8, int(side) // (step if side >= step else 8) * (step if side >= step else 8)) for side in (w, h))


def choose_bucket(width: int, height: int, resolution: int, bucketing: bool, step: int,
                  min_size: int, max_size: int) -> tuple:
    """The (w, h) an image trains at. Without bucketing: the resolution's square. With bucketing: the bucket whose
    aspect ratio is nearest, unless covering it would enlarge the image by a bucket step or more (a 64 px image in
    a 512 px bucket); then a bucket of its own size (`own_size_bucket`). Smaller enlargements (500 px to 512) are
    what snapping to the bucket grid costs anyway and stay as they were."""
    if not bucketing:
        return (resolution, resolution)
    bucket = nearest_bucket(width, height, make_buckets(resolution, min_size, max_size, step))
    if bucket[0] >= width + step or bucket[1] >= height + step:
        return own_size_bucket(width, height, resolution, step)
    return bucket


# ------------------------------------------------------------------------------------------ folder

def list_images(folder: str) -> list[str]:
    if not folder or not os.path.isdir(folder):
        raise LoraFileError(f"Dataset folder {folder!r} does not exist. Give the path of a folder of images "
                            f"(absolute, or relative to ComfyUI's input folder).")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    if not names:
        raise LoraFileError(f"Dataset folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}). Put the "
                            f"training images there, each with a same-name .txt caption.")
    return [os.path.join(folder, n) for n in names]


def read_caption(image_path: str, policy: str, default_caption: str) -> str:
    """The caption of an image: its same-name .txt file, else what `policy` says."""
    if policy not in CAPTION_POLICIES:
        raise LoraValueError(f"Unknown missing-caption policy {policy!r}; choose from {list(CAPTION_POLICIES)}.")
    txt = os.path.splitext(image_path)[0] + ".txt"
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8", errors="replace") as handle:
            text = handle.read(MAX_CAPTION_CHARS + 1)
        caption = " ".join(text.split())
        if len(text) > MAX_CAPTION_CHARS:
            log.warning("LoRA Core: caption %s is longer than %d characters; only its start is used (a text "
                        "encoder reads at most a few hundred tokens)", txt, MAX_CAPTION_CHARS)
            caption = caption[:MAX_CAPTION_CHARS]
        return caption
    if policy == "use caption widget":
        return default_caption.strip()
    if policy == "use file name":
        return os.path.splitext(os.path.basename(image_path))[0].replace("_", " ")
    if policy == "empty":
        return ""
    return None  # "error": the caller collects every missing file into one message


def load_folder(folder: str, resolution: int = 512, repeats: int = 1, bucketing: bool = True,
                bucket_step: int = 64, min_bucket: int = 256, max_bucket: int = 1024,
                missing_caption: str = "error", default_caption: str = "",
                captions: Optional[CaptionOptions] = None, frames: int = 0, videos: bool = True) -> TrainDataset:
    """Load every image of `folder` with its caption into a TrainDataset (images fitted to buckets). With `frames`
    (4k + 1, or -1 for every frame), sub-folders of frames and video clips are video samples too
    (lora_core.train.video)."""
    from PIL import Image, UnidentifiedImageError

    if videos:   # frames != 0: a video dataset (lora_core.train.video); 0: images, as before
        from .video import ignored_videos, load_video_folder

        if frames:
            return load_video_folder(folder, frames, resolution, repeats, bucketing, bucket_step, min_bucket,
                                     max_bucket, missing_caption, default_caption, captions)
        ignored_videos(folder)

    paths = list_images(folder)
    missing, broken, samples = [], [], []
    for path in paths:
        caption = read_caption(path, missing_caption, default_caption)
        if caption is None:
            missing.append(os.path.basename(path))
            continue
        try:
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise LoraFileError(
                        f"Dataset image {path} is {img.width}x{img.height} pixels, too large to train on (more than "
                        f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels, or a decompression bomb). Downscale it or remove "
                        f"it from the folder.")
                img.load()
                bucket = choose_bucket(img.width, img.height, resolution, bucketing, bucket_step,
                                       min_bucket, max_bucket)
                samples.append(Sample(caption, image=fit_to_bucket(img, bucket), source=path,
                                      original_size=(img.width, img.height)))
        except Image.DecompressionBombError as error:
            raise LoraFileError(f"Dataset image {path} was refused as a decompression bomb ({error}). Downscale "
                                f"it or remove it from the folder.") from None
        except (UnidentifiedImageError, OSError, ValueError) as error:
            broken.append(f"{os.path.basename(path)} ({type(error).__name__})")
    if broken:
        raise LoraFileError(f"Dataset folder {folder}: {len(broken)} image(s) cannot be read: {broken[:5]}. "
                            f"Remove or re-save them (PNG/JPEG/WebP).")
    if missing:
        raise LoraFileError(f"Dataset folder {folder}: {len(missing)} image(s) have no caption file, e.g. "
                            f"{missing[:5]} (expected e.g. {os.path.splitext(missing[0])[0]}.txt). Add the .txt "
                            f"files or set the missing-caption policy to use the caption widget, the file name or "
                            f"an empty caption.")
    return TrainDataset(samples, repeats=repeats, captions=captions or CaptionOptions(), resolution=resolution,
                        buckets=_bucket_list(resolution, bucketing, bucket_step, min_bucket, max_bucket),
                        fit=_fit(resolution, bucketing, bucket_step, min_bucket, max_bucket))


def _fit(resolution: int, bucketing: bool, step: int, min_size: int, max_size: int) -> dict:
    return dict(resolution=resolution, bucketing=bucketing, bucket_step=step, min_bucket=min_size, max_bucket=max_size)


def _bucket_list(resolution: int, bucketing: bool, step: int, min_size: int, max_size: int) -> list:
    return make_buckets(resolution, min_size, max_size, step) if bucketing else [(resolution, resolution)]


def from_images(images: Sequence[torch.Tensor], captions: Sequence[str], resolution: int = 512, repeats: int = 1,
                bucketing: bool = True, bucket_step: int = 64, min_bucket: int = 256, max_bucket: int = 1024,
                caption_options: Optional[CaptionOptions] = None) -> TrainDataset:
    """Build a dataset from (3, H, W) [0, 1] image tensors and one caption each (or one for all)."""
    if len(captions) == 1 and len(images) > 1:
        captions = list(captions) * len(images)
    if len(captions) != len(images):
        raise LoraValueError(f"{len(images)} images but {len(captions)} captions: give one caption per image or one "
                             f"for all.")
    samples = []
    for i, (image, caption) in enumerate(zip(images, captions)):
        _, h, w = image.shape
        bucket = choose_bucket(w, h, resolution, bucketing, bucket_step, min_bucket, max_bucket)
        samples.append(Sample(caption, image=tensor_to_bucket(image.float(), bucket), source=f"image {i}",
                              original_size=(w, h)))
    return TrainDataset(samples, repeats=repeats, captions=caption_options or CaptionOptions(), resolution=resolution,
                        buckets=_bucket_list(resolution, bucketing, bucket_step, min_bucket, max_bucket),
                        fit=_fit(resolution, bucketing, bucket_step, min_bucket, max_bucket))


# ------------------------------------------------------------------------------------------ batching

class BatchPlan:
    """Deterministic batches grouped by bucket (every batch has one latent shape).

    An epoch is every sample `repeats` times; within a bucket the order is shuffled, cut into batches, and
    the batch order shuffled — all with a generator seeded by (seed, epoch). `batch(i)` for any global
    batch index i is therefore the same with or without a resume in between.
    """

    def __init__(self, dataset: TrainDataset, batch_size: int, seed: int):
        if batch_size < 1:
            raise LoraValueError(f"batch size must be >= 1, got {batch_size}.")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        by_bucket: dict = {}
        for index, sample in enumerate(dataset.samples):
            by_bucket.setdefault(sample.batch_key, []).extend([index] * dataset.repeats)
        self.by_bucket = [by_bucket[k] for k in sorted(by_bucket)]
        self.batches_per_epoch = sum(-(-len(v) // batch_size) for v in self.by_bucket)
        self._epoch_cache: dict = {}

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_cache:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            batches = []
            for members in self.by_bucket:
                members = list(members)
                rng.shuffle(members)
                batches += [members[i:i + self.batch_size] for i in range(0, len(members), self.batch_size)]
            rng.shuffle(batches)
            self._epoch_cache = {epoch: batches}
        return self._epoch_cache[epoch]

    def batch(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.batches_per_epoch)
        return self._epoch(epoch)[position]

    def epoch_of(self, index: int) -> int:
        return index // self.batches_per_epoch
