"""Output files: where each render's file goes, and writing it so that a half-written file
never counts.

Every output is written to a hidden temporary name in its final folder, flushed to disk and
renamed in; only then is the render recorded as done. A crash in between leaves either no
file (the render runs again) or a complete file that the re-run overwrites with the same
name, so no render is ever counted twice or saved half.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from daemon.contract.spec import RenderSpec
from daemon.folders import TEMP_PREFIX

# The machine-readable chunk: the full RenderSpec as JSON, enough to re-render exactly.
SPEC_CHUNK = "lorafarm"


def write_png(image: Image.Image, path: Path, spec: RenderSpec, text: dict[str, str]) -> Path:
    """Write `image` with its text chunks to `path` atomically; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        if _latin1(value):
            info.add_text(key, value)
        else:
            info.add_itxt(key, value)  # A1111 writes non-Latin-1 prompts as iTXt too
    info.add_text(SPEC_CHUNK, spec.to_json())
    temp = path.with_name(TEMP_PREFIX + path.name)
    with temp.open("wb") as handle:
        image.save(handle, format="PNG", pnginfo=info)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_folder(path.parent)
    return path


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable before the database says the file exists."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_mp4(frames: list[Image.Image], fps: int, path: Path, spec: RenderSpec,
              text: dict[str, str]) -> Path:
    """H.264 / yuv420p MP4 (plays everywhere) with the text entries as MP4 metadata, where
    Civitai reads `parameters` (moov/udta/meta, ffmpeg's use_metadata_tags), written to a
    temporary name and renamed in."""
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(TEMP_PREFIX + path.name)
    width, height = frames[0].size
    # yuv420p halves the chroma planes: odd sizes cannot be encoded.
    even = (width - width % 2, height - height % 2)
    container = av.open(str(temp), "w", format="mp4",
                        options={"movflags": "use_metadata_tags"})
    try:
        for key, value in text.items():
            container.metadata[key] = value
        container.metadata[SPEC_CHUNK] = spec.to_json()
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = even
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            rgb = frame.convert("RGB")
            if rgb.size != even:
                rgb = rgb.crop((0, 0, *even))
            packet_frame = av.VideoFrame.from_ndarray(np.asarray(rgb), format="rgb24")
            for packet in stream.encode(packet_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    with temp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_folder(path.parent)
    return path


def read_spec(path: Path) -> RenderSpec:
    """The RenderSpec embedded in a lorafarm PNG or MP4."""
    if path.suffix.lower() == ".mp4":
        import av

        with av.open(str(path)) as container:
            return RenderSpec.from_json(container.metadata[SPEC_CHUNK])
    with Image.open(path) as image:
        return RenderSpec.from_json(image.text[SPEC_CHUNK])


def remove_leftover_temporaries(outputs: Path) -> list[Path]:
    """Delete temporaries a crash left behind (start-up repair)."""
    removed = []
    if outputs.is_dir():
        for temp in outputs.rglob(TEMP_PREFIX + "*"):
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True
