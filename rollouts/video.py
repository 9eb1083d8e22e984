"""Episode videos: the rendered frames as mp4, with the sampler, the current plan's latency and
the success so far written on each frame (OpenCV, which robosuite already depends on, encodes
mp4 without a system ffmpeg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.files import atomic_path


def write_video(path: Path, result, label: str, fps: int = 20) -> None:
    """Write `result.frames` (RGB, one per control step plus the first) to `path`, atomically."""
    import cv2

    frames = result.frames or []
    if not frames:
        raise ValueError(f"{path}: the episode has no frames (was it run with render=True?)")
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    with atomic_path(path) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        if not writer.isOpened():
            raise RuntimeError(f"{path}: OpenCV cannot open an mp4 writer")
        try:
            _write_frames(writer, frames, result, label)
        finally:
            writer.release()


def _write_frames(writer, frames: list, result, label: str) -> None:
    """Each frame with the label, the current plan's latency and rounds, and the step (or SUCCESS)."""
    import cv2

    plan_at = np.searchsorted([p.step for p in result.plans], np.arange(len(frames)), side="right") - 1
    succeeded_at = result.length if result.success else None
    for i, frame in enumerate(frames):
        img = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR)
        plan = result.plans[max(0, min(plan_at[i], len(result.plans) - 1))] if result.plans else None
        lines = [label, f"plan {plan.latency_ms:.0f} ms, {plan.parallel_iters} it" if plan else "",
                 "SUCCESS" if succeeded_at is not None and i >= succeeded_at else f"step {i}"]
        for j, text in enumerate(lines):
            y = 16 + 16 * j
            cv2.putText(img, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(img, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
        writer.write(img)
