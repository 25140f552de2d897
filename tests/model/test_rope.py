"""model/rope.py: 2D RoPE positions, tables and the rotation (official layout: fact sheet section 3.4)."""

import csv

import pytest
import torch

from model.rope import apply_rope, grid_positions, inverse_frequencies, rope_table, scale_positions
from model.schedules import SCALES_1M, ScaleSchedule
from tests.conftest import DATA

HEAD_DIM = 16  # 4 row pairs + 4 column pairs
GRID = ScaleSchedule.custom(((1, 1), (8, 8)))  # scale 1: positions 0..7 on both axes


def _official_rows() -> dict[tuple[float, int], tuple[list[int], list[int]]]:
    with open(DATA / "infinity-rope2d-positions-1M.tsv") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        return {
            (float(t), int(k)): ([int(v) for v in rows.split(",")], [int(v) for v in cols.split(",")])
            for t, k, _h, _w, _H, _W, rows, cols in reader
        }


OFFICIAL = _official_rows()


def _random(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _rope_at(x: torch.Tensor, table: torch.Tensor, token: int) -> torch.Tensor:
    """Rotate one head vector (hd,) as if it sat at `token` of the table."""
    return apply_rope(x.view(1, 1, 1, -1), table[:, token : token + 1])[0, 0, 0]


# ---- positions --------------------------------------------------------------------------------
@pytest.mark.parametrize("template", sorted(SCALES_1M))
def test_sequence_positions_follow_the_official_table_in_row_major_order(template):
    schedule = ScaleSchedule.official(template, "1M")
    pos = scale_positions(schedule)
    assert pos.shape == (schedule.total_tokens, 2) and pos.dtype == torch.int64
    for k, ((h, w), start) in enumerate(zip(schedule.scales, schedule.offsets, strict=True)):
        rows, cols = OFFICIAL[(template, k)]
        block = pos[start : start + h * w].view(h, w, 2)  # token i*w + j is (row i, col j)
        assert block[:, :, 0].tolist() == [[r] * w for r in rows], (template, k)
        assert block[:, :, 1].tolist() == [cols] * h, (template, k)


def test_smaller_budgets_are_prefixes_with_the_same_positions():
    full = scale_positions(ScaleSchedule.official(1.333, "1M"))
    for pn in ("0.06M", "0.25M", "0.60M"):
        part = ScaleSchedule.official(1.333, pn)
        assert torch.equal(scale_positions(part), full[: part.total_tokens])


def test_grid_positions_edge_cases():
    assert grid_positions(1, 64).tolist() == [0]
    assert grid_positions(64, 64).tolist() == list(range(64))  # the final scale: identity grid
    assert grid_positions(72 // 4, 72).dtype == torch.int64
    # float32 product then half-to-even: 4.5 * i for the 1.333 template's 16-row scale
    assert grid_positions(16, 72)[:4].tolist() == [0, 4, 9, 14]


def test_a_custom_schedule_uses_its_own_last_scale_as_reference():
    pos = scale_positions(ScaleSchedule.custom(((1, 1), (2, 3), (4, 6))))
    assert pos[1:7].tolist() == [[0, 0], [0, 2], [0, 4], [2, 0], [2, 2], [2, 4]]
    assert pos[-1].tolist() == [3, 5]


# ---- frequencies and tables -------------------------------------------------------------------
def test_inverse_frequencies_are_10000_to_the_minus_4k_over_head_dim():
    inv = inverse_frequencies(128)
    assert inv.shape == (32,) and inv.dtype == torch.float32
    expected = torch.tensor([10000.0 ** (-4 * k / 128) for k in range(32)])
    torch.testing.assert_close(inv, expected, atol=0, rtol=1e-6)
    assert inv[0] == 1.0 and bool((inv[1:] < inv[:-1]).all())


def test_table_shape_angles_and_layout():
    schedule = ScaleSchedule.official(1.25, "0.06M")
    table = rope_table(schedule, HEAD_DIM, "cpu")
    L, q = schedule.total_tokens, HEAD_DIM // 4
    assert table.shape == (2, L, HEAD_DIM // 2) and table.dtype == torch.float32
    torch.testing.assert_close(table[0] ** 2 + table[1] ** 2, torch.ones(L, HEAD_DIM // 2))
    pos = scale_positions(schedule).float()
    inv = inverse_frequencies(HEAD_DIM)
    angles = torch.atan2(table[1], table[0])
    # the first hd/4 pairs turn with the row position, the rest with the column position
    expected = torch.cat((pos[:, :1] * inv, pos[:, 1:] * inv), dim=1)
    torch.testing.assert_close(torch.cos(angles), torch.cos(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.sin(angles), torch.sin(expected), atol=1e-5, rtol=0)
    assert torch.equal(table[:, 0], torch.stack((torch.ones(2 * q), torch.zeros(2 * q))))  # start token (0, 0)


def test_a_scale_slice_of_the_table_is_that_scales_rotation():
    """With a KV cache, scale k reads the table at its sequence offset (fact sheet, pitfall 4)."""
    schedule = ScaleSchedule.official(1.0, "0.06M")
    table = rope_table(schedule, HEAD_DIM, "cpu")
    k = 4
    start, n = schedule.offsets[k], schedule.lengths[k]
    h, w = schedule.scales[k]
    rows = grid_positions(h, 64)[:, None].expand(h, w).reshape(-1).float()
    cols = grid_positions(w, 64)[None, :].expand(h, w).reshape(-1).float()
    inv = inverse_frequencies(HEAD_DIM)
    expected = torch.cat((torch.outer(rows, inv), torch.outer(cols, inv)), dim=1)
    torch.testing.assert_close(table[0, start : start + n], expected.cos())
    torch.testing.assert_close(table[1, start : start + n], expected.sin())


def test_tables_are_cached_per_schedule_head_dim_and_device():
    schedule = ScaleSchedule.official(2.0, "0.06M")
    a = rope_table(schedule, HEAD_DIM, "cpu")
    assert rope_table(schedule, HEAD_DIM, torch.device("cpu")) is a
    assert rope_table(schedule, 2 * HEAD_DIM, "cpu").shape[-1] == HEAD_DIM


# ---- the rotation -----------------------------------------------------------------------------
def test_rotation_keeps_shape_dtype_and_every_pairs_norm():
    table = rope_table(ScaleSchedule.official(1.0, "0.06M"), HEAD_DIM, "cpu")
    x = _random((2, 3, table.shape[1], HEAD_DIM))
    y = apply_rope(x, table)
    assert y.shape == x.shape and y.dtype == x.dtype

    def pair_norm(t):
        return t.unflatten(-1, (-1, 2)).norm(dim=-1)

    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert apply_rope(x.bfloat16(), table).dtype == torch.bfloat16


def test_rotation_is_complex_multiplication_on_interleaved_pairs():
    table = rope_table(GRID, HEAD_DIM, "cpu")
    x = _random((1, 1, table.shape[1], HEAD_DIM), seed=1)
    y = apply_rope(x, table)
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    turned = torch.view_as_real(z * torch.complex(table[0], table[1])).flatten(-2)
    torch.testing.assert_close(y, turned)
    assert torch.equal(y[..., 0, :], x[..., 0, :])  # position (0, 0): identity


def test_query_key_product_depends_only_on_the_offset():
    table = rope_table(GRID, HEAD_DIM, "cpu")

    def token(r, c):  # scale 1 of GRID
        return 1 + 8 * r + c

    q, k = _random((HEAD_DIM,), seed=2), _random((HEAD_DIM,), seed=3)

    def dot(qpos, kpos):
        return torch.dot(_rope_at(q, table, token(*qpos)), _rope_at(k, table, token(*kpos))).item()

    same_offset = [((3, 5), (1, 2)), ((6, 3), (4, 0)), ((7, 7), (5, 4))]  # offset (+2, +3)
    values = [dot(a, b) for a, b in same_offset]
    assert max(values) - min(values) < 1e-5, values
    assert abs(dot((3, 5), (1, 2)) - dot((3, 5), (2, 1))) > 1e-3  # another offset differs
    # rows rotate only the first hd/4 pairs: a column shift leaves their partial product alone
    half = HEAD_DIM // 2

    def part(qpos, kpos):
        return torch.dot(_rope_at(q, table, token(*qpos))[:half], _rope_at(k, table, token(*kpos))[:half]).item()

    assert abs(part((3, 5), (1, 2)) - part((3, 0), (1, 7))) < 1e-5


def test_a_single_token_schedule_is_the_identity():
    table = rope_table(ScaleSchedule.custom(((1, 1),)), 4, "cpu")
    assert table.shape == (2, 1, 2)
    x = _random((3, 2, 1, 4))
    assert torch.equal(apply_rope(x, table), x)
