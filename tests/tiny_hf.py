"""Tiny random Hugging Face models built in code, the way diffusers' own tests build theirs (no hub): a CLIP
tokenizer from a vocabulary written here, Stable Diffusion and aMUSEd pipelines, a CLIP model + processor.
Shared by the diffusers, plugin and submission tests; needs the optional extra."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
import transformers

WORDS = ["a", "red", "blue", "green", "circle", "square", "photo", "of", "cat", "dog", "the", "on", "left"]


def clip_tokenizer(d: Path):
    """A CLIPTokenizer from a vocabulary written here (no hub): whole words and letters, one-line merges."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in WORDS:
        vocab[w + "</w>"] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=16)


def text_config(tok, **kw):
    return transformers.CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                       intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                       vocab_size=len(tok), max_position_embeddings=16, **kw)


def tiny_sd(d: Path) -> Path:
    torch.manual_seed(0)
    tok = clip_tokenizer(d.parent / "tok-sd")
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2)
    vae = diffusers.AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  norm_num_groups=2, sample_size=32)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                    set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=transformers.CLIPTextModel(text_config(tok)),
                                             tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(d))
    return d


def tiny_amused(d: Path) -> Path:
    torch.manual_seed(0)
    tok = clip_tokenizer(d.parent / "tok-amused")
    transformer = diffusers.UVit2DModel(
        hidden_size=32, cond_embed_dim=32, micro_cond_encode_dim=2, micro_cond_embed_dim=10, encoder_hidden_size=32,
        vocab_size=32, codebook_size=32, in_channels=8, block_out_channels=8, num_res_blocks=1, downsample=True,
        upsample=True, block_num_heads=1, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
        sample_size=4)
    vq = diffusers.VQModel(block_out_channels=[8], down_block_types=["DownEncoderBlock2D"], in_channels=3,
                           latent_channels=8, layers_per_block=1, norm_num_groups=8, num_vq_embeddings=32,
                           out_channels=3, sample_size=8, up_block_types=["UpDecoderBlock2D"],
                           mid_block_add_attention=False, lookup_from_codebook=True)
    pipe = diffusers.AmusedPipeline(vqvae=vq, tokenizer=tok, transformer=transformer,
                                    text_encoder=transformers.CLIPTextModelWithProjection(text_config(tok, projection_dim=32)),
                                    scheduler=diffusers.AmusedScheduler(mask_token_id=31))  # codebook size - 1
    pipe.save_pretrained(str(d))
    return d


def tiny_hf_clip(d: Path) -> Path:
    torch.manual_seed(0)
    tok = clip_tokenizer(d.parent / "tok-clip")
    config = transformers.CLIPConfig(
        text_config=dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8), projection_dim=16)
    image_proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model = transformers.CLIPModel(config)
    with torch.no_grad():  # random towers give cosines around 0, which clip_score clamps to 0 in every row: both
        # towers' pooled outputs share a constant part and one projection, so cosines sit well above 0 and spread
        model.text_projection.weight.copy_(model.visual_projection.weight)
        for ln in (model.text_model.final_layer_norm, model.vision_model.post_layernorm):
            ln.weight.fill_(0.5)
            ln.bias.fill_(1.0)
    model.save_pretrained(str(d))
    transformers.CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(str(d))
    return d


def tiny_sd_with_checker(d: Path, flag_everything: bool = True) -> Path:
    """The tiny SD pipeline with a Stable Diffusion safety checker built here (a tiny CLIP vision tower) whose
    thresholds flag every image (`flag_everything`) or none: the checker's real code path, black-out included."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    base = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd(d.parent / f"{d.name}-base")))
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                         vocab_size=64, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                           image_size=32, patch_size=8), projection_dim=16)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():  # score = cos - threshold: a threshold of -2 is exceeded by every image, +2 by none
        checker.concept_embeds_weights.fill_(-2.0 if flag_everything else 2.0)
        checker.special_care_embeds_weights.fill_(-2.0 if flag_everything else 2.0)
    extractor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = diffusers.StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                             unet=base.unet, scheduler=base.scheduler, safety_checker=checker,
                                             feature_extractor=extractor, requires_safety_checker=True)
    pipe.save_pretrained(str(d))
    return d


def tiny_sd_nan_vae(d: Path) -> Path:
    """The tiny SD pipeline whose VAE decoder's output convolution holds NaN: every image comes out non-finite,
    as an fp16 VAE overflow leaves it."""
    base = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd(d.parent / f"{d.name}-base")))
    with torch.no_grad():
        base.vae.decoder.conv_out.bias.fill_(float("nan"))
    base.save_pretrained(str(d))
    return d


def tiny_aesthetic(d: Path, width: int) -> Path:
    """A LAION-layout aesthetic predictor (random weights) over `width`-wide CLIP embeddings."""
    from promptmill.models.aesthetic import AestheticPredictor
    from safetensors.torch import save_file

    torch.manual_seed(0)
    d.mkdir(parents=True, exist_ok=True)
    dims = [width, 12, 8, 6, 4, 1]
    save_file(AestheticPredictor(dims).state_dict(), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"family": "aesthetic", "dims": dims}))
    return d


def tiny_lora(sd_dir: Path, d: Path, seed: int = 0) -> Path:
    """A LoRA adapter for the tiny SD UNet's attention projections, saved as diffusers' save_lora_weights writes
    it (safetensors); its up-projections are random, so it changes the pixels (peft's default starts them at 0)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_dir))
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    diffusers.StableDiffusionPipeline.save_lora_weights(str(d), unet_lora_layers=layers, safe_serialization=True)
    return d
