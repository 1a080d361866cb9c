"""``clsp train``'s generation options: only those given are asked of the pool, so the
pool's model settings decide the rest (docs/api.md, "Params left unset")."""

from __future__ import annotations

import json

import numpy as np

from clsp_positives.proto.codec import decode_request, encode_request
from clsp_positives.trainer.config import GENERATION_OPTIONS, TrainConfig
from clsp_positives.trainer.config_file import config_text


def test_options_left_out_stay_unset_in_the_request_and_the_written_config() -> None:
    config = TrainConfig(dataset="digits", gen_steps=30)
    params = config.generation_params(k=2)
    assert params.model_fields_set == {"steps", "k", "expect_model"}
    assert params.steps == 30
    # a resumed or repeated run leaves them to the pool as well
    stored = config.stored()
    assert stored["gen_steps"] == 30
    assert not {n for n in GENERATION_OPTIONS.names if n != "gen_steps"} & set(stored)
    again = TrainConfig.model_validate(stored)
    assert again.generation_params(k=2) == params
    assert "gen_eta" not in config_text(config, "run/config.yaml")


def test_the_wire_carries_only_the_given_params() -> None:
    anchors = np.zeros((1, 16, 16, 1), np.uint8)
    params = TrainConfig(dataset="digits").generation_params()
    body, content_type = encode_request(anchors, None, params)
    sent = decode_request(body, content_type)
    assert sent.params.model_fields_set <= {"k", "expect_model"}
    assert json.loads(sent.params.canonical())["interpolation_weight"] == 0.1  # the default
