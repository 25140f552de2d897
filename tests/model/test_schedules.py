import csv

import pytest
import torch

from model.rope import grid_positions, scale_positions
from model.schedules import PN_SCALES, SCALES_1M, TEMPLATES, ScaleSchedule, nearest_template, schedule_for_size
from tests.conftest import DATA

# (template, 1M image HxW, 1M L, 0.25M L, 0.06M L) from the official fact sheet.
OFFICIAL = [
    (1.0, (1024, 1024), 10521, 2521, 521),
    (1.25, (1120, 896), 10774, 2814, 614),
    (0.8, (896, 1120), 10774, 2814, 614),
    (1.333, (1152, 864), 10973, 2657, 665),
    (0.75, (864, 1152), 10973, 2657, 665),
    (1.5, (1248, 832), 10997, 2759, 533),
    (0.666, (832, 1248), 10997, 2759, 533),
    (1.75, (1344, 768), 11252, 2628, 472),
    (0.571, (768, 1344), 11252, 2628, 472),
    (2.0, (1440, 720), 11269, 2681, 451),
    (0.5, (720, 1440), 11269, 2681, 451),
    (2.5, (1600, 640), 10805, 2555, 555),
    (0.4, (640, 1600), 10805, 2555, 555),
    (3.0, (1776, 592), 11123, 2588, 509),
    (0.333, (592, 1776), 11123, 2588, 509),
]


@pytest.mark.parametrize("template,image,l_1m,l_025,l_006", OFFICIAL)
def test_official_schedule_lengths_and_sizes(template, image, l_1m, l_025, l_006):
    assert ScaleSchedule.official(template, "1M").image_size() == image
    assert ScaleSchedule.official(template, "1M").total_tokens == l_1m
    assert ScaleSchedule.official(template, "0.25M").total_tokens == l_025
    assert ScaleSchedule.official(template, "0.06M").total_tokens == l_006


def test_all_templates_and_budgets_exist():
    assert set(TEMPLATES) == set(SCALES_1M) and len(TEMPLATES) == 15
    for t in TEMPLATES:
        for pn, n in PN_SCALES.items():
            s = ScaleSchedule.official(t, pn)
            assert s.num_scales == n and s.scales == SCALES_1M[t][:n]
    assert ScaleSchedule.official(1.0, "0.60M").total_tokens == 6425


def test_offsets_and_vae_scales():
    s = ScaleSchedule.official(1.0, "0.06M")
    assert s.offsets == (0, 1, 5, 21, 57, 121, 265)
    assert s.vae_scales(patchify=True)[-1] == (32, 32)


def test_unknown_template_or_pn_lists_valid_ones():
    with pytest.raises(ValueError, match="valid"):
        ScaleSchedule.official(1.1, "1M")
    with pytest.raises(ValueError, match=r"0\.06M"):
        ScaleSchedule.official(1.0, "2M")


def test_snapping():
    assert nearest_template(1.0) == 1.0 and nearest_template(0.52) == 0.5 and nearest_template(10) == 3.0
    s = schedule_for_size(1024, 1024)
    assert (s.h_div_w, s.pn) == (1.0, "1M")
    s = schedule_for_size(512, 512)
    assert (s.h_div_w, s.pn) == (1.0, "0.25M")
    s = schedule_for_size(1344, 768, pn="0.06M")  # wide: h/w = 0.571
    assert (s.h_div_w, s.image_size()) == (0.571, (192, 336))
    with pytest.raises(ValueError):
        schedule_for_size(0, 10)


def _tsv_rows():
    with open(DATA / "infinity-rope2d-positions-1M.tsv") as f:
        yield from csv.DictReader(f, delimiter="\t")


def test_rope_positions_equal_the_official_table():
    rows = list(_tsv_rows())
    assert len(rows) == 15 * 13
    for row in rows:
        template, k = float(row["h_div_w_template"]), int(row["scale_idx"])
        h, w = int(row["h"]), int(row["w"])
        assert SCALES_1M[template][k] == (h, w)
        ref_h, ref_w = SCALES_1M[template][-1]
        assert (ref_h, ref_w) == (int(row["final_H"]), int(row["final_W"]))
        col_name = next(c for c in row if c.startswith("col_positions"))
        row_name = next(c for c in row if c.startswith("row_positions"))
        assert grid_positions(h, ref_h).tolist() == [int(v) for v in row[row_name].split(",")], (template, k)
        assert grid_positions(w, ref_w).tolist() == [int(v) for v in row[col_name].split(",")], (template, k)


def test_rope_positions_of_smaller_budgets_use_the_1m_grid():
    pos = scale_positions(ScaleSchedule.official(1.0, "0.25M"))
    last = pos[-32 * 32 :]
    assert last[:, 0].unique().tolist() == list(range(0, 64, 2))
    assert torch.equal(pos[0], torch.tensor([0, 0]))
