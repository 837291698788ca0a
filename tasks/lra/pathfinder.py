"""Pathfinder, generated locally (Linsley et al. 2018; LRA Sec. 2.5, Path-X at 128 x 128).

Each image holds two long curvy dashed contours of ``contour_length`` dashes and
``num_distractors`` short ones; two dots (disks of radius size / 16) mark contour ends. Label 1: the dots sit at
both ends of the same contour; label 0: at one end of each of the two long contours (so both
classes show the same contours and dots, and only following a contour tells them apart).
Difficulty grows with contour length (LRA's hardest setting has 14 dashes). A contour is a
walk of dashes whose heading turns by at most ``max_turn`` radians per dash; walks that
leave the canvas are redrawn. Labels are balanced exactly (half of each, seeded shuffle).
The image is read as a sequence of size * size pixel tokens (value + 1, 0 is padding).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from tasks.cache import cached
from tasks.lra.base import LRATask


def _walk(rng, size, n, dash, margin):
    for _ in range(200):
        p = rng.uniform(margin, size - margin, 2)
        theta = rng.uniform(0, 2 * math.pi)
        pts = [p]
        ok = True
        for _ in range(n):
            theta += rng.uniform(-1, 1) * _walk.max_turn
            p = p + dash * np.array([math.cos(theta), math.sin(theta)])
            if not (margin <= p[0] < size - margin and margin <= p[1] < size - margin):
                ok = False
                break
            pts.append(p)
        if ok:
            return np.array(pts)  # [n + 1, 2] dash end points
    raise RuntimeError("could not draw a contour inside the canvas: lower contour_length or dash")


def _draw_contour(img, pts, dash_fill):
    for a, b in zip(pts[:-1], pts[1:]):
        t = np.linspace(0.0, dash_fill, max(2, int(np.linalg.norm(b - a) * 4)))  # the dash, then a gap
        xy = a[None] + t[:, None] * (b - a)[None]
        ij = np.floor(xy).astype(int)
        img[ij[:, 1], ij[:, 0]] = 1.0


def _draw_dot(img, c, r):
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    img[(xx + 0.5 - c[0]) ** 2 + (yy + 0.5 - c[1]) ** 2 <= r * r] = 1.0


def render(rng, label: int, size=32, contour_length=14, num_distractors=2, max_turn=math.pi / 6,
           dash_fill=0.6, dot_radius=None):
    """One image [size, size] uint8 and its metadata (contours, dot positions)."""
    _walk.max_turn = max_turn
    dash = size / 16.0  # dash period in pixels: 2 at 32 x 32, 8 at 128 x 128
    r = dot_radius or max(1.5, size / 16.0)
    margin = r + 1
    img = np.zeros((size, size), dtype=np.float32)
    a = _walk(rng, size, contour_length, dash, margin)
    b = _walk(rng, size, contour_length, dash, margin)
    for c in (a, b, *(_walk(rng, size, max(1, contour_length // 3), dash, margin)
                      for _ in range(num_distractors))):
        _draw_contour(img, c, dash_fill)
    dots = (a[0], a[-1]) if label == 1 else (a[0], b[-1])
    for d in dots:
        _draw_dot(img, d, r)
    return (img * 255).astype(np.uint8), {"a": a, "b": b, "dots": dots}


def generate(n, seed, size=32, contour_length=14, num_distractors=2, max_turn=math.pi / 6,
             dash_fill=0.6, desc="pathfinder"):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2)
    imgs = np.zeros((n, size, size), dtype=np.uint8)
    for i in tqdm(range(n), desc=desc, unit="img", leave=False):
        imgs[i], _ = render(rng, int(labels[i]), size, contour_length, num_distractors, max_turn, dash_fill)
    return imgs, labels


def load(cfg) -> dict:
    key = {k: cfg[k] for k in ("num_train", "num_val", "num_test", "size", "contour_length",
                               "num_distractors", "max_turn", "dash_fill", "seed")}

    def build():
        out = {}
        for i, split in enumerate(("train", "val", "test")):
            imgs, labels = generate(int(cfg[f"num_{split}"]), int(cfg.seed) * 1000 + i, int(cfg.size),
                                    int(cfg.contour_length), int(cfg.num_distractors), float(cfg.max_turn),
                                    float(cfg.dash_fill), desc=f"pathfinder {split}")
            out[split] = (torch.from_numpy(imgs.reshape(len(imgs), -1).astype(np.int16) + 1),
                          torch.from_numpy(labels.astype(np.int64)))
        return out

    if int(cfg.max_len) != int(cfg.size) ** 2:
        raise ValueError(f"max_len={cfg.max_len} must be size * size = {int(cfg.size) ** 2}")
    data = cached("lra_pathfinder", {"task": "pathfinder", **key}, build)
    return {**{s: data[s] for s in ("train", "val", "test")}, "vocab_size": 257, "num_classes": 2,
            "pad_id": 0, "cls_id": None}


class Pathfinder(LRATask):
    """Pathfinder and Path-X (conf/task/lra/pathfinder.yaml), generated as above."""

    def load(self) -> dict:
        return load(self.cfg)
