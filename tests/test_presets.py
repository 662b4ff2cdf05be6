"""The presets resolve as documented: the cpu preset is the reference recipe, flags override it, clear refusals."""

from __future__ import annotations

import pytest

from training.args import parse_args


def test_the_cpu_preset_is_the_reference_recipe():
    model_args, data_args, run_args = parse_args([])
    assert (model_args.n_layer, model_args.n_embd, data_args.jitter_views, data_args.flip_p) == (8, 256, 2, 0.5)
    assert run_args.cache_features and run_args.precision == "bf16" and data_args.larger_images_dir is None
    assert run_args.brand_step_epochs == 12  # then a brand step, fit on every training product


def test_flags_override_the_preset():
    model_args, data_args, run_args = parse_args(["--n_layer", "4", "--jitter_views", "0", "--brand_step_epochs", "0"])
    assert (model_args.n_layer, data_args.jitter_views, run_args.brand_step_epochs) == (4, 0, 0)


def test_the_presets_views_give_way_where_maps_are_not_cached():
    # a Hub ViT or a from-scratch encoder computes its inputs each step: the preset's cached views cannot apply
    _, data_args, run_args = parse_args(["--cache_features", "false", "--encoder", "vit_scratch"])
    assert data_args.jitter_views == 0 and run_args.brand_step_epochs == 0 and not run_args.cache_features
    _, paper_data, paper_run = parse_args(["--preset", "paper"])
    assert paper_data.jitter_views == 0 and paper_run.brand_step_epochs == 0


def test_asking_for_views_without_cached_maps_is_refused():
    with pytest.raises(SystemExit, match="--jitter_views works on cached"):
        parse_args(["--jitter_views", "2", "--cache_features", "false"])
    with pytest.raises(SystemExit, match="--brand_step_epochs works on cached"):
        parse_args(["--brand_step_epochs", "3", "--cache_features", "false"])
    with pytest.raises(SystemExit, match="--brand_step_epochs must be 0 or more"):
        parse_args(["--brand_step_epochs", "-1"])
