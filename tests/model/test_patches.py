import pytest
import torch

from model.patches import GridShape, axis_positions, from_patches, grid_shape, to_patches


def test_axis_positions_cover_the_edge() -> None:
    assert axis_positions(240, 30, 30) == [30 * i for i in range(8)]
    assert axis_positions(100, 30, 30) == [0, 30, 60, 70]
    assert axis_positions(30, 30, 15) == [0]
    with pytest.raises(ValueError, match="smaller than the patch"):
        axis_positions(20, 30, 30)


@pytest.mark.parametrize("size,patch,stride", [((240, 360), 30, 30), ((64, 96), 16, 8), ((50, 77), 30, 30), ((45, 45), 30, 15)])
def test_round_trip(size: tuple[int, int], patch: int, stride: int) -> None:
    frames = torch.rand(3, 2, *size)
    patches, grid = to_patches(frames, patch, stride)
    assert grid == grid_shape(*size, patch, stride)
    assert patches.shape == (3 * grid.rows * grid.cols, 2, patch, patch)
    assert torch.allclose(from_patches(patches, grid, *size, stride), frames)


def test_patch_order_is_frame_then_row_major() -> None:
    frames = torch.zeros(2, 1, 60, 90)
    frames[1, 0, 30:60, 60:90] = 1.0  # frame 1, row 1, col 2
    patches, grid = to_patches(frames, 30, 30)
    assert grid == GridShape(2, 3)
    per_patch = patches.flatten(1).mean(1).view(2, grid.rows, grid.cols)
    assert per_patch[1, 1, 2] == 1.0
    assert per_patch.sum() == 1.0


def test_wrong_rank_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(T, C, H, W\)"):
        to_patches(torch.zeros(1, 30, 30), 30, 30)


@pytest.mark.parametrize("size,patch,stride", [((240, 360), 30, 30), ((50, 77), 30, 30), ((64, 96), 16, 8)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_every_patch_is_the_frame_slice_at_its_grid_position(size, patch: int, stride: int, dtype) -> None:
    """Exact tilings take a reshape, others a gather: both give the slices themselves, in order."""
    frames = (torch.rand(2, 2, *size) * 255).to(dtype)
    patches, grid = to_patches(frames, patch, stride)
    expected = [frames[t, :, y : y + patch, x : x + patch] for t in range(2)
                for y in axis_positions(size[0], patch, stride) for x in axis_positions(size[1], patch, stride)]
    assert patches.dtype == dtype and patches.is_contiguous()
    assert torch.equal(patches, torch.stack(expected))
