"""Frames <-> patch grid.

The grid covers the whole frame: positions step by ``stride`` and a last row/column is aligned to the
bottom/right edge when the frame size is not a multiple of the stride. Patches are ordered frame by
frame, row by row (row-major), so ``scores.view(frames, rows, cols)`` is the anomaly map.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class GridShape(NamedTuple):
    rows: int
    cols: int


def axis_positions(length: int, patch_size: int, stride: int) -> list[int]:
    """Top (or left) offsets of the patches along one axis, the last one flush with the edge."""
    if length < patch_size:
        raise ValueError(f"frame side {length} is smaller than the patch size {patch_size}")
    positions = list(range(0, length - patch_size + 1, stride))
    if positions[-1] != length - patch_size:
        positions.append(length - patch_size)
    return positions


def grid_shape(height: int, width: int, patch_size: int, stride: int) -> GridShape:
    return GridShape(
        len(axis_positions(height, patch_size, stride)), len(axis_positions(width, patch_size, stride))
    )


def to_patches(frames: torch.Tensor, patch_size: int, stride: int) -> tuple[torch.Tensor, GridShape]:
    """(T, C, H, W) -> ((T * rows * cols, C, P, P), grid). One copy, no Python loop over patches."""
    if frames.dim() != 4:
        raise ValueError(f"frames must be (T, C, H, W), got shape {tuple(frames.shape)}")
    count, channels, height, width = frames.shape
    # (also refuses a frame smaller than a patch, on either path)
    row_starts, col_starts = axis_positions(height, patch_size, stride), axis_positions(width, patch_size, stride)
    if height % patch_size == width % patch_size == 0 and stride == patch_size:
        # a grid that tiles the frame exactly (Ped2: 8 x 12): a reshape, 3-4x faster than the gather
        rows, cols = height // patch_size, width // patch_size
        tiles = frames.reshape(count, channels, rows, patch_size, cols, patch_size).permute(0, 2, 4, 1, 3, 5)
        return tiles.reshape(-1, channels, patch_size, patch_size), GridShape(rows, cols)
    ys = torch.tensor(row_starts, device=frames.device)
    xs = torch.tensor(col_starts, device=frames.device)
    # unfold with step 1 is a view; index_select copies only the rows/columns the grid uses.
    rows = frames.unfold(2, patch_size, 1).index_select(2, ys)  # (T, C, R, W, Py)
    grid = rows.unfold(3, patch_size, 1).index_select(3, xs)  # (T, C, R, Cols, Py, Px)
    patches = grid.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels, patch_size, patch_size)
    return patches, GridShape(len(ys), len(xs))


def from_patches(
    patches: torch.Tensor, grid: GridShape, height: int, width: int, stride: int
) -> torch.Tensor:
    """Inverse of to_patches: overlapping pixels are averaged. Returns (T, C, H, W)."""
    patch_size = patches.shape[-1]
    channels = patches.shape[1]
    per_frame = grid.rows * grid.cols
    if patches.shape[0] % per_frame:
        raise ValueError(f"{patches.shape[0]} patches do not fill whole {grid} grids")
    frames = patches.shape[0] // per_frame
    tiles = patches.view(frames, grid.rows, grid.cols, channels, patch_size, patch_size)
    total = patches.new_zeros(frames, channels, height, width)
    count = patches.new_zeros(1, 1, height, width)
    for r, y in enumerate(axis_positions(height, patch_size, stride)):
        for c, x in enumerate(axis_positions(width, patch_size, stride)):
            total[:, :, y : y + patch_size, x : x + patch_size] += tiles[:, r, c]
            count[:, :, y : y + patch_size, x : x + patch_size] += 1
    return total / count
