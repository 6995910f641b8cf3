"""Each network of the model folder, described once: where its weights come from in the original
files, its PyTorch module, its TensorRT-LLM engine module and the script that builds it.

Everything that handles "every network" (conversion, the manifest, loading, the engine checkpoints
and folders) reads this table; adding a network is one entry here plus its module in models/.
No torch here: the commands check their arguments against it before importing anything heavy.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

# The original files: three from HUB_REPO, CLIP's text tower from CLIP_REPO (in CLIP_DIR), the
# image tower of the tasks that read images from CLIP_IMAGE_REPO, and the caption decoder's GPT-2
# tokenizer from GPT2_REPO.
UVIT_FILE, CAPTION_FILE, AUTOENCODER_FILE, CLIP_DIR = (
    "uvit_v1.pth", "caption_decoder.pth", "autoencoder_kl.pth", "clip-vit-large-patch14")
HUB_REPO, CLIP_REPO = "thu-ml/unidiffuser-v1", "openai/clip-vit-large-patch14"
CLIP_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
CLIP_IMAGE_DIR, CLIP_IMAGE_REPO = "clip-vit-base-patch32", "openai/clip-vit-base-patch32"
CLIP_IMAGE_FILES = ("config.json", "model.safetensors")
GPT2_DIR, GPT2_REPO = "gpt2", "openai-community/gpt2"
GPT2_FILES = ("vocab.json", "merges.txt")
HUB_FILES = (UVIT_FILE, CAPTION_FILE, AUTOENCODER_FILE)
# Folder, hub repo and files of each transformers folder among the originals.
HUB_FOLDERS = ((CLIP_DIR, CLIP_REPO, CLIP_FILES), (CLIP_IMAGE_DIR, CLIP_IMAGE_REPO, CLIP_IMAGE_FILES),
               (GPT2_DIR, GPT2_REPO, GPT2_FILES))
ORIGINALS = (*HUB_FILES, *(f"{d}/{f}" for d, _, files in HUB_FOLDERS for f in files))


@dataclass(frozen=True)
class Part:
    """Tensors one original file contributes to a network. `file` ending in "/" is a transformers
    model folder (its model.safetensors, or pytorch_model.bin)."""
    file: str
    keep: tuple[str, ...] = ()     # key prefixes read, after `strip` (every key when empty)
    strip: str = ""                # removed where present: DataParallel saved "module.<name>"
    drop: tuple[str, ...] = ()     # keys the module does not hold (buffers it computes itself)
    convert: str | None = None     # "package.module:function" applied to what was selected

    def describe(self) -> str:
        return self.file + (" " + " + ".join(f"{k}*" for k in self.keep) if self.keep else "")

    def select(self, sd: dict) -> dict:
        """The tensors of one original file that belong to the network, under the network's names."""
        out = {}
        for key, value in sd.items():
            key = key[len(self.strip):] if self.strip and key.startswith(self.strip) else key
            if (not self.keep or key.startswith(self.keep)) and key not in self.drop:
                out[key] = value
        return _resolve(self.convert)(out) if self.convert else out


def _resolve(path: str):
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


@dataclass(frozen=True)
class Network:
    name: str                       # MODEL/<name>.safetensors, MODEL/trtllm/<name>/, MODEL/engines/<name>/
    module: str                     # "package.module:Class" of the PyTorch reference, built from its config
    config: str                     # the ModelConfig field that holds its configuration
    parts: tuple[Part, ...]         # where its weights are in the original files
    engine: str | None = None       # "package.module:Class" of its TensorRT-LLM network
    build_script: str | None = None
    architecture: str | None = None  # the TensorRT-LLM checkpoint's "architecture"
    mismatch_hint: str = ""         # said when an original file does not fit the module
    required: bool = True           # text-to-image needs it; the others' networks may be absent
    derived: tuple[str, ...] = ()   # state-dict keys not stored: the module fills them (tied weights)
    needs: tuple[str, ...] = ()     # other original files its tasks need (the caption decoder's tokenizer)

    @property
    def file(self) -> str:
        return f"{self.name}.safetensors"

    @property
    def source(self) -> str:
        """What the manifest records as the network's origin."""
        return " + ".join(p.describe() for p in self.parts)

    def torch_class(self):
        return _resolve(self.module)

    def engine_class(self):
        return _resolve(self.engine)


NETWORKS: dict[str, Network] = {n.name: n for n in (
    Network("text_encoder", "models.text_encoder:TextEncoder", "text_encoder",
            (Part(f"{CLIP_DIR}/", keep=("text_model.",), drop=("text_model.embeddings.position_ids",)),
             Part(CAPTION_FILE, keep=("encode_prefix.",), strip="module.")),
            "models.trtllm.text_encoder:TextEncoder", "build_clip.py", "UnidiffuserCLIPTextEncoder"),
    Network("uvit", "models.uvit:UViT", "uvit", (Part(UVIT_FILE),),
            "models.trtllm.uvit:UViT", "build_uvit.py", "UnidiffuserUViT",
            mismatch_hint="A UniDiffuser-v0 UViT (no data-type token) does not fit: v1 (uvit_v1.pth) is expected."),
    Network("vae_decoder", "models.vae_decoder:VAEDecoder", "vae_decoder",
            (Part(AUTOENCODER_FILE, keep=("decoder.", "post_quant_conv.")),),
            "models.trtllm.vae_decoder:VAEDecoder", "build_decoder.py", "UnidiffuserVAEDecoder"),
    # The networks of the tasks that read images or write texts (tasks.py).
    Network("vae_encoder", "models.vae_encoder:VAEEncoder", "vae_decoder",
            (Part(AUTOENCODER_FILE, keep=("encoder.", "quant_conv.")),), required=False),
    Network("image_encoder", "models.image_encoder:ImageEncoder", "image_encoder",
            (Part(f"{CLIP_IMAGE_DIR}/", keep=("vision_model.", "visual_projection."),
                  drop=("vision_model.embeddings.position_ids",)),), required=False),
    Network("caption_decoder", "models.caption_decoder:CaptionDecoder", "caption_decoder",
            (Part(CAPTION_FILE, keep=("decode_prefix.", "gpt."), strip="module.",
                  convert="models.caption_decoder:original_state_dict"),),
            required=False, derived=("gpt.lm_head.weight",), needs=tuple(f"{GPT2_DIR}/{f}" for f in GPT2_FILES)),
)}
NAMES = tuple(n for n, net in NETWORKS.items() if net.required)     # text-to-image's, in every model folder
ALL = tuple(NETWORKS)


def build(name: str, cfg, device=None):
    """The network `name` of ModelConfig `cfg`, with torch's default initialisation; on device
    "meta" it has shapes only (built in milliseconds, to be filled by load_state_dict(assign=True))."""
    import torch
    net = NETWORKS[name]
    make = net.torch_class()
    if device is None:
        return make(getattr(cfg, net.config))
    with torch.device(device), (_skip_init() if torch.device(device).type == "meta" else _nothing()):
        return make(getattr(cfg, net.config))


def _nothing():
    from contextlib import nullcontext
    return nullcontext()


def _skip_init():
    """Module constructors' random initialisation, skipped: on the meta device there is no data to
    fill, and running the init ops' meta kernels makes torch import its compiler stack (~1 s)."""
    import torch

    class SkipInit(torch.overrides.TorchFunctionMode):
        OPS = {"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
               "xavier_normal_", "zeros_", "ones_", "constant_", "zero_", "fill_", "orthogonal_"}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", None) in self.OPS:
                return args[0] if args else (kwargs or {}).get("tensor")
            return func(*args, **(kwargs or {}))

    return SkipInit()
