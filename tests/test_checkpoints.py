"""Reading the original files: only what text-to-image needs, from either CLIP weight format."""
import torch
from safetensors.torch import load_file, save_file

from models.config import PRESETS
from unidiffuser import networks
from unidiffuser.weights import originals, random_weights

CFG = PRESETS["tiny"]


def test_clip_vision_tower_and_extras_are_ignored(tmp_path):
    random_weights.write_random_originals(tmp_path, "tiny")
    clip = tmp_path / networks.CLIP_DIR
    # Copies: safetensors 0.7 (the TensorRT-LLM 1.2 image's) returns tensors mapped from the file,
    # which save_file below rewrites in place (the project itself replaces files, files.atomic_write).
    sd = {k: v.clone() for k, v in load_file(str(clip / "model.safetensors")).items()}
    text_keys = set(sd)
    save_file({**sd, "vision_model.embeddings.patch_embedding.weight": torch.ones(4, 3, 2, 2),
               "text_model.embeddings.position_ids": torch.arange(77)[None],   # saved by older exports
               "logit_scale": torch.ones(()), "text_projection.weight": torch.ones(2, 2)}, str(clip / "model.safetensors"))
    got = originals.read_network(tmp_path, "text_encoder", CFG)
    assert set(got) == text_keys | {"encode_prefix.weight", "encode_prefix.bias"}
    assert torch.equal(got["text_model.final_layer_norm.weight"], sd["text_model.final_layer_norm.weight"])


def test_clip_pytorch_model_bin_and_unprefixed_caption_keys(tmp_path):
    random_weights.write_random_originals(tmp_path, "tiny")
    clip = tmp_path / networks.CLIP_DIR
    sd = load_file(str(clip / "model.safetensors"))
    (clip / "model.safetensors").unlink()
    torch.save(sd, clip / "pytorch_model.bin")
    cap = torch.load(tmp_path / networks.CAPTION_FILE, weights_only=True)
    torch.save({k.removeprefix("module."): v for k, v in cap.items()}, tmp_path / networks.CAPTION_FILE)
    got = originals.read_network(tmp_path, "text_encoder", CFG)
    assert torch.equal(got["encode_prefix.weight"], cap["module.encode_prefix.weight"])
    assert set(got) - {"encode_prefix.weight", "encode_prefix.bias"} == set(sd)
