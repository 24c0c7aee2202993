"""Tiny instances of the host's ``comfy.supported_models`` classes, for the family matrix (tests only).

Each entry of :data:`SPECS` names a real ``comfy.supported_models`` config class and gives it a tiny
``unet_config`` (only sizes shrink; every architecture switch keeps the value real checkpoints set). The
model is made the way ComfyUI loads a checkpoint, ``config.get_model(state_dict, device=cpu)``, so the real
``comfy.model_base`` wrapper, latent format and model sampling come with it; the weights are drawn by the
seeded initialiser every tiny model uses. :func:`conditioning` makes a CONDITIONING of the family's own kind
(cross-attention width, pooled output, guidance, an I2V concat latent) and :func:`latent` a VAE-space LATENT of
the family's rank ([B,C,H,W] image, [B,C,T,H,W] video, [B,C,L] audio).

Built models are cached per (name, seed): the matrix builds each at most once per process.
"""
from __future__ import annotations

import atexit
import types
import zlib
from dataclasses import dataclass, field

import torch

from .tiny_checkpoint import SD_UNET_FLAGS, seeded_init_

DEFAULT_SEED = 0


@dataclass(frozen=True)
class Spec:
    config: str                      # comfy.supported_models class name
    unet: dict                       # tiny unet_config
    ctx: int                         # cross-attention width of the conditioning
    tokens: int = 8
    pooled: int | None = None        # pooled_output width
    extras: dict = field(default_factory=dict)   # plain extras (guidance, sizes, ...)
    concat: bool = False             # I2V: a concat_latent_image of the latent's shape
    unclip: int | None = None        # unCLIP: a CLIP-vision image embedding of this width
    exact_replay: str = "auto"       # the sampler's exact_replay (bdia where the guidance is not comparable)
    pooled_3d: bool = False          # pooled_output as [1, 1, width] (Stable Cascade's CLIP-G)
    mask: bool = False               # a text attention_mask (T5 encoders give one)
    llama: tuple | None = None       # HiDream's Llama hidden states: (layers, tokens, width)
    t5: tuple | None = None          # HunyuanDiT's second text encoder: (tokens, width) states + mask
    frames: int = 0                  # latent T (0: not a video latent)
    batch: int = 1                   # the matrix's latent batch (SVD: its video frames)
    size: int = 8                    # latent H = W (or L for audio)
    state_dict: object = None          # keys get_model inspects (e.g. a v-prediction flag)
    note: str = ""                   # what this entry stands for (README table)


def _unet(ctx: int, **over) -> dict:
    d = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
         "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
         "transformer_depth_middle": 1, "context_dim": ctx, "num_heads": 2, "num_head_channels": -1,
         **SD_UNET_FLAGS}
    d.update(over)
    return d


def _sdxl_unet(ctx: int, adm: int) -> dict:
    return _unet(ctx, num_classes="sequential", adm_in_channels=adm, use_linear_in_transformer=True,
                 transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1], num_heads=-1, num_head_channels=16)


def _wan(in_dim: int, out_dim: int, model_type: str = "t2v") -> dict:
    return {"image_model": "wan2.1", "model_type": model_type, "patch_size": (1, 2, 2), "text_len": 8,
            "in_dim": in_dim, "dim": 32, "ffn_dim": 64, "freq_dim": 32, "text_dim": 24, "out_dim": out_dim,
            "num_heads": 2, "num_layers": 1, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True,
            "eps": 1e-6}


def _hunyuan_video(in_ch: int = 16, out_ch: int = 16, vec: int | None = 32, patch=(1, 2, 2), axes=(4, 6, 6),
                   guidance: bool = True) -> dict:
    return {"image_model": "hunyuan_video", "in_channels": in_ch, "out_channels": out_ch, "patch_size": list(patch),
            "vec_in_dim": vec, "axes_dim": list(axes), "meanflow": False, "context_in_dim": 24, "hidden_size": 32,
            "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "theta": 256,
            "qkv_bias": True, "byt5": False, "guidance_embed": guidance, "use_cond_type_embedding": False,
            "vision_in_dim": None}


def _flux(**over) -> dict:
    d = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
         "context_in_dim": 24, "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
         "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True}
    d.update(over)
    return d


def _lumina(**over) -> dict:
    d = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 32, "cap_feat_dim": 24, "n_layers": 1,
         "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "qk_norm": True, "axes_dims": [4, 6, 6],
         "axes_lens": [300, 64, 64], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0, "multiple_of": 16}
    d.update(over)
    return d


def _cosmos_v1() -> dict:
    return {"image_model": "cosmos", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
            "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 32, "num_blocks": 1,
            "num_heads": 2, "crossattn_emb_channels": 24, "block_config": "FA-CA-MLP", "concat_padding_mask": True,
            "pos_emb_cls": "rope3d", "pos_emb_learnable": False, "pos_emb_interpolation": "crop",
            "block_x_format": "THWBD", "affline_emb_norm": True, "use_adaln_lora": True, "adaln_lora_dim": 16,
            "extra_per_block_abs_pos_emb": True, "extra_per_block_abs_pos_emb_type": "learnable",
            "rope_t_extrapolation_ratio": 2.0}


def _cosmos_predict2(in_ch: int = 16) -> dict:
    return {"image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
            "in_channels": in_ch, "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1,
            "concat_padding_mask": True, "crossattn_emb_channels": 24, "pos_emb_cls": "rope3d",
            "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30,
            "use_adaln_lora": True, "adaln_lora_dim": 16, "model_channels": 32, "num_blocks": 1, "num_heads": 2,
            "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0,
            "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0}


def _stable_audio_sd() -> dict:
    """The seconds_start/seconds_total number embedders StableAudio.get_model loads from the checkpoint."""
    import comfy.ldm.audio.embedders as emb
    sd = {}
    for i, key in enumerate(("seconds_start", "seconds_total")):
        torch.manual_seed(77 + i)
        e = emb.NumberConditioner(768, min_val=0, max_val=512)
        for k, v in e.state_dict().items():
            sd[f"conditioner.conditioners.{key}.{k}"] = torch.randn_like(v) * 0.1
    return sd


SDXL_ADM = 32 + 6 * 256
SDXL_SIZES = dict(width=64, height=64, crop_w=0, crop_h=0, target_width=64, target_height=64)

SPECS: dict = {
    # ---- UNet image models
    "SD15": Spec("SD15", _unet(24), 24, note="SD1.x, EPS"),
    "SD20": Spec("SD20", _unet(24, num_heads=-1, num_head_channels=16), 24,
                 state_dict={"v_pred": torch.tensor([])}, note="SD2.x-v, V_PREDICTION"),
    "SDXL": Spec("SDXL", _sdxl_unet(24, SDXL_ADM), 24, pooled=32, extras=SDXL_SIZES,
                 note="SDXL, pooled output + size conditioning"),
    "SSD1B": Spec("SSD1B", _sdxl_unet(24, SDXL_ADM), 24, pooled=32, extras=SDXL_SIZES, note="SSD-1B (SDXL distilled)"),
    "Segmind_Vega": Spec("Segmind_Vega", _sdxl_unet(24, SDXL_ADM), 24, pooled=32, extras=SDXL_SIZES,
                         note="Segmind Vega (SDXL distilled)"),
    "KOALA_700M": Spec("KOALA_700M", _sdxl_unet(24, SDXL_ADM), 24, pooled=32, extras=SDXL_SIZES,
                       note="KOALA 700M (SDXL distilled)"),
    "KOALA_1B": Spec("KOALA_1B", _sdxl_unet(24, SDXL_ADM), 24, pooled=32, extras=SDXL_SIZES,
                     note="KOALA 1B (SDXL distilled)"),
    "SDXLRefiner": Spec("SDXLRefiner", _sdxl_unet(24, 32 + 5 * 256), 24, pooled=32, extras=SDXL_SIZES,
                        note="SDXL refiner: aesthetic-score conditioning"),
    "SD21UnclipL": Spec("SD21UnclipL", _unet(24, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True,
                                             adm_in_channels=1536, num_classes="sequential"),
                        24, state_dict={"v_pred": torch.tensor([])}, unclip=768, exact_replay="bdia",
                        note="SD2.1 unCLIP: CLIP-vision image embedding, noise-augmented"),
    "Stable_Cascade_C": Spec("Stable_Cascade_C", {"stable_cascade_stage": "c", "c_in": 16, "c_out": 16, "c_r": 16,
                                                  "patch_size": 1, "c_cond": 32, "c_hidden": [32, 32],
                                                  "nhead": [2, 2], "blocks": [[1, 1], [1, 1]],
                                                  "block_repeat": [[1, 1], [1, 1]], "level_config": ["CTA", "CTA"],
                                                  "c_clip_text": 24, "c_clip_text_pooled": 32, "c_clip_img": 768,
                                                  "c_clip_seq": 4, "switch_level": [False]},
                             24, pooled=32, pooled_3d=True,
                             note="Stable Cascade Stage C: StableCascadeSampling (cosine, shift 2)"),
    "SVD_img2vid": Spec("SVD_img2vid", _unet(24, in_channels=8, num_heads=-1, num_head_channels=16,
                                             use_linear_in_transformer=True, adm_in_channels=768,
                                             num_classes="sequential", use_temporal_attention=True,
                                             use_temporal_resblock=True, extra_ff_mix_layer=True,
                                             use_spatial_context=True, merge_strategy="learned_with_images",
                                             merge_factor=0.0, video_kernel_size=[3, 1, 1],
                                             disable_temporal_crossattention=False, max_ddpm_temb_period=10000),
                        24, tokens=1, concat=True, batch=3,
                        extras={"fps": 6, "motion_bucket_id": 127, "augmentation_level": 0},
                        note="Stable Video Diffusion: V_PREDICTION_EDM, frames as the batch, concat image"),
    # refused by name (built to check the refusal on the real class)
    "LotusD": Spec("LotusD", _unet(24, use_linear_in_transformer=True, adm_in_channels=4, num_classes="sequential",
                                   num_heads=-1, num_head_channels=16), 24, note="Lotus depth/normal predictor"),
    # ---- flow / DiT image models
    "SD3": Spec("SD3", {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "input_size": None,
                        "adm_in_channels": 32, "num_patches": 32 * 32, "pos_embed_max_size": 32,
                        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
                        "context_embedder_config": {"target": "torch.nn.Linear",
                                                    "params": {"in_features": 24, "out_features": 64}}},
                24, pooled=32, note="SD3, pooled output"),
    "Flux": Spec("Flux", _flux(), 24, pooled=32, extras={"guidance": 3.5}, note="Flux dev: guidance embed"),
    "FluxSchnell": Spec("FluxSchnell", _flux(guidance_embed=False), 24, pooled=32,
                        note="Flux schnell: shift 1, no guidance embed"),
    "Chroma": Spec("Chroma", {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "in_dim": 64,
                              "out_dim": 32, "hidden_dim": 32,
                              "n_layers": 1, "context_in_dim": 24, "hidden_size": 32, "mlp_ratio": 2.0,
                              "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6],
                              "theta": 10000, "patch_size": 2, "qkv_bias": True},
                   24, extras={"pooled_output": None}, note="Chroma: distilled modulation, no pooled output"),
    "FluxInpaint": Spec("FluxInpaint", _flux(in_channels=96), 24, pooled=32, extras={"guidance": 30.0}, concat=True,
                        note="Flux Fill: concat image latent + mask"),
    "HunyuanImage21": Spec("HunyuanImage21", _hunyuan_video(in_ch=64, out_ch=64, vec=None, patch=(1, 1),
                                                            axes=(8, 8)),
                           24, extras={"guidance": 3.5}, note="HunyuanImage 2.1: 64-channel latent"),
    "Flux2": Spec("Flux2", _flux(image_model="flux2", in_channels=128, out_channels=128, patch_size=1, vec_in_dim=None,
                                 axes_dim=[4, 4, 4, 4], theta=2000, mlp_ratio=3.0, global_modulation=True,
                                 mlp_silu_act=True, qkv_bias=False, ops_bias=False, default_ref_method="index",
                                 ref_index_scale=10.0),
                  24, extras={"guidance": 4.0, "pooled_output": None}, note="Flux 2: 128-channel latent"),
    "AuraFlow": Spec("AuraFlow", {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 32, "n_layers": 2,
                                  "n_double_layers": 1, "n_heads": 2, "global_conddim": 32, "cond_seq_dim": 24,
                                  "max_seq": 16 * 16}, 24, note="AuraFlow (SDXL latent, flow)"),
    "PixArtAlpha": Spec("PixArtAlpha", {"image_model": "pixart_alpha", "micro_condition": True, "num_heads": 2,
                                        "patch_size": 2, "hidden_size": 48, "in_channels": 4, "depth": 1,
                                        "model_max_length": 8, "input_size": 16, "pe_interpolation": 0.25,
                                        "caption_channels": 24},
                        24, extras={"width": 320, "height": 320}, size=40,   # PixArt's position base needs >= 33
                        note="PixArt-alpha: size and aspect conditioning"),
    "PixArtSigma": Spec("PixArtSigma", {"image_model": "pixart_sigma", "micro_condition": False, "num_heads": 2,
                                        "patch_size": 2, "hidden_size": 32, "in_channels": 4, "depth": 1,
                                        "model_max_length": 8, "input_size": 16, "pe_interpolation": 0.25,
                                        "caption_channels": 24}, 24, size=40, note="PixArt-sigma"),
    "HunyuanDiT": Spec("HunyuanDiT", {"image_model": "hydit", "depth": 2, "hidden_size": 32, "num_heads": 2,
                                      "patch_size": 2, "in_channels": 4, "input_size": 16, "text_states_dim": 24,
                                      "text_states_dim_t5": 32, "text_len": 8, "text_len_t5": 6},
                       24, mask=True, extras={"width": 64, "height": 64},
                       t5=(6, 32), note="HunyuanDiT: CLIP + mT5 states with masks, image size"),
    "HunyuanDiT1": Spec("HunyuanDiT1", {"image_model": "hydit1", "depth": 2, "hidden_size": 32, "num_heads": 2,
                                        "patch_size": 2, "in_channels": 4, "input_size": 16, "text_states_dim": 24,
                                        "text_states_dim_t5": 32, "text_len": 8, "text_len_t5": 6,
                                        "size_cond": True, "use_style_cond": True},
                        24, mask=True, extras={"width": 64, "height": 64}, t5=(6, 32),
                        note="HunyuanDiT 1.0: + size and style embeddings"),
    "Omnigen2": Spec("Omnigen2", {"image_model": "omnigen2", "axes_dim_rope": [4, 6, 6], "axes_lens": [64, 64, 64],
                                  "ffn_dim_multiplier": None, "hidden_size": 32, "in_channels": 16, "multiple_of": 16,
                                  "norm_eps": 1e-5, "num_attention_heads": 2, "num_kv_heads": 1, "num_layers": 1,
                                  "num_refiner_layers": 1, "out_channels": None, "patch_size": 2,
                                  "text_feat_dim": 24, "timestep_scale": 1000.0},
                     24, mask=True, note="OmniGen2 (Flux latent, text attention mask)"),
    "Lumina2": Spec("Lumina2", _lumina(), 24, note="Lumina 2 (NextDiT)"),
    "ZImage": Spec("ZImage", _lumina(dim=256, axes_dims=[32, 48, 48], n_kv_heads=2, z_image_modulation=True,
                                     time_scale=1000.0, ffn_dim_multiplier=8.0 / 3.0, rope_theta=256.0), 24,
                   note="Z-Image (NextDiT, z-image modulation)"),
    "QwenImage": Spec("QwenImage", {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16,
                                    "patch_size": 2, "num_layers": 1, "attention_head_dim": 16,
                                    "num_attention_heads": 2, "joint_attention_dim": 24,
                                    "axes_dims_rope": (4, 6, 6)},
                      24, frames=1, note="Qwen-Image: Wan 2.1 latent, 5-D [B,16,1,H,W]"),
    "CosmosT2IPredict2": Spec("CosmosT2IPredict2", _cosmos_predict2(), 24, frames=1,
                              note="Cosmos Predict2 text-to-image: COSMOS_RFLOW, 5-D Wan 2.1 latent"),
    "HiDream": Spec("HiDream", {"image_model": "hidream", "attention_head_dim": 16, "axes_dims_rope": [8, 4, 4],
                                "caption_channels": [24, 20], "max_resolution": [128, 128], "in_channels": 16,
                                "llama_layers": [0, 1], "num_attention_heads": 2, "num_routed_experts": 4,
                                "num_activated_experts": 2, "num_layers": 1, "num_single_layers": 1,
                                "out_channels": 16, "patch_size": 2, "text_emb_dim": 32},
                    24, pooled=32, llama=(2, 6, 20),
                    note="HiDream: T5 + Llama hidden states per block, pooled output, mixture of experts"),
    # ---- audio (3-D latents)
    "StableAudio": Spec("StableAudio", {"audio_model": "dit1.0", "io_channels": 64, "embed_dim": 768, "depth": 1,
                                        "num_heads": 2, "cond_token_dim": 768, "global_cond_dim": 1536,
                                        "project_cond_tokens": False, "transformer_type": "continuous_transformer"},
                        768, size=16, state_dict=_stable_audio_sd,   # width 768: its cross-attention needs
                        # heads (width/64) divisible by the 768-wide context's 12, as 1536 is in the real model
                        note="Stable Audio 1.0: 3-D [B,64,L] latent, V_PREDICTION_CONTINUOUS"),
    # ---- video models (5-D latents)
    "WAN21_T2V": Spec("WAN21_T2V", _wan(16, 16), 24, frames=3, note="Wan 2.1 text-to-video"),
    "WAN21_I2V": Spec("WAN21_I2V", _wan(36, 16, "i2v"), 24, frames=3, concat=True,
                      note="Wan 2.1 image-to-video: concat latent + mask channels"),
    "WAN22_T2V": Spec("WAN22_T2V", dict(_wan(48, 48), model_type="t2v"), 24, frames=3,
                      note="Wan 2.2 5B: 48-channel Wan 2.2 latent"),
    "HunyuanVideo": Spec("HunyuanVideo", _hunyuan_video(), 24, pooled=32, extras={"guidance": 6.0}, frames=3,
                         note="HunyuanVideo: pooled output + guidance embed"),
    "HunyuanVideoI2V": Spec("HunyuanVideoI2V", _hunyuan_video(in_ch=33), 24, pooled=32, extras={"guidance": 6.0},
                            frames=3, concat=True, note="HunyuanVideo I2V: concat latent + mask channels"),
    "HunyuanVideoSkyreelsI2V": Spec("HunyuanVideoSkyreelsI2V", _hunyuan_video(in_ch=32), 24, pooled=32,
                                    extras={"guidance": 6.0}, frames=3, concat=True,
                                    note="SkyReels I2V (HunyuanVideo): concat latent"),
    "CosmosI2V": Spec("CosmosI2V", dict(_cosmos_v1(), in_channels=17), 24, frames=2, extras={"frame_rate": 24},
                      concat=True, note="Cosmos 1.0 image-to-video: mask channel"),
    "CosmosI2VPredict2": Spec("CosmosI2VPredict2", _cosmos_predict2(17), 24, frames=2, concat=True,
                              note="Cosmos Predict2 image-to-video: COSMOS_RFLOW, mask channel"),
    "LTXV": Spec("LTXV", {"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 32,
                          "attention_head_dim": 16, "num_attention_heads": 2, "caption_channels": 24,
                          "num_layers": 1}, 24, frames=2, size=4, extras={"frame_rate": 25}, mask=True,
                 note="LTXV: 128-channel latent, frame rate"),
    "GenmoMochi": Spec("GenmoMochi", {"image_model": "mochi_preview", "depth": 1, "patch_size": 2, "num_heads": 2,
                                      "hidden_size_x": 32, "hidden_size_y": 32, "mlp_ratio_x": 1536 * 8 / 32,
                                      "mlp_ratio_y": 2.0, "learn_sigma": False, "in_channels": 12,
                                      "qk_norm": True, "qkv_bias": False, "out_bias": True, "attn_drop": 0.0,
                                      "patch_embed_bias": True, "posenc_preserve_area": True,
                                      "timestep_mlp_bias": True, "attend_to_padding": False,
                                      "timestep_scale": 1000.0, "use_t5": True, "t5_feat_dim": 24,
                                      "t5_token_length": 8, "rope_theta": 10000.0},
                       24, frames=2, mask=True, note="Mochi: 12-channel latent, T5 attention mask"),
    "CosmosT2V": Spec("CosmosT2V", _cosmos_v1(), 24, frames=2, extras={"frame_rate": 24},
                      note="Cosmos 1.0 text-to-video: EDM, sigma_data 0.5"),
    # ---- ComfyUI 0.33 only (absent classes are left out of names() on older hosts)
    "CogVideoX_T2V": Spec("CogVideoX_T2V", {"image_model": "cogvideox", "num_attention_heads": 2,
                                            "attention_head_dim": 16, "in_channels": 16, "out_channels": 16,
                                            "time_embed_dim": 32, "text_embed_dim": 24, "num_layers": 1,
                                            "patch_size": 2, "max_text_seq_length": 8,
                                            "use_rotary_positional_embeddings": True,
                                            "use_learned_positional_embeddings": False},
                          24, frames=2, note="CogVideoX: V_PREDICTION_DDPM, zero terminal SNR (0.33)"),
    "WAN21_FlowRVS": Spec("WAN21_FlowRVS", dict(_wan(16, 16), model_type="flow_rvs"), 24, frames=2,
                          note="Wan FlowRVS: IMG_TO_IMG_FLOW predictor, refused (0.33)"),
}


def names() -> list:
    """The entries whose supported_models class exists on this host."""
    import comfy.supported_models as sm
    return [n for n, s in SPECS.items() if hasattr(sm, s.config)]


_CACHE: dict = {}
atexit.register(_CACHE.clear)   # drop the models before interpreter teardown (ModelPatcher.__del__ needs comfy)


def tiny_model(name: str, seed: int = DEFAULT_SEED):
    """A ModelPatcher around a tiny real model of the supported_models class ``name`` (CPU, fp32, seeded);
    built once per (name, seed) and process (callers must not patch it in place: ModelPatcher clones)."""
    key = (name, int(seed))
    if key not in _CACHE:
        _CACHE[key] = _build(name, int(seed))
    return _CACHE[key]


# fields newer ComfyUI (0.33) added to a model's params dataclass, with the value model_detection gives classic
# checkpoints; added only where the host's dataclass has the field (0.3.75's would reject it)
_NEWER_FIELDS = {
    "flux": ("comfy.ldm.flux.model", "FluxParams", {"txt_ids_dims": []}),
    "flux2": ("comfy.ldm.flux.model", "FluxParams", {"txt_ids_dims": [3]}),
    "chroma": ("comfy.ldm.chroma.model", "ChromaParams", {"txt_ids_dims": [], "vec_in_dim": None}),
    "hunyuan_video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams", {"meanflow_sum": False}),
}


def _host_unet(unet: dict) -> dict:
    import importlib
    out = dict(unet)
    if unet.get("image_model") in _NEWER_FIELDS:
        mod, cls, extra = _NEWER_FIELDS[unet["image_model"]]
        fields = getattr(getattr(importlib.import_module(mod), cls), "__dataclass_fields__", {})
        out.update({k: v for k, v in extra.items() if k in fields and k not in out})
    return out


def _build(name: str, seed: int):
    import comfy.model_patcher
    import comfy.supported_models as sm

    spec = SPECS[name]
    cfg = getattr(sm, spec.config)(_host_unet(spec.unet))
    for k in cfg.unet_extra_config:   # the class's defaults (e.g. 64-channel heads) would not fit a tiny width
        if k in spec.unet:
            cfg.unet_config[k] = spec.unet[k]
    cfg.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sd = spec.state_dict() if callable(spec.state_dict) else dict(spec.state_dict or {})
        model = cfg.get_model(sd, device=cpu)
    # the weight seed depends on the name only (not on which other entries exist)
    seeded_init_(model.diffusion_model, seed=5000 + seed + zlib.crc32(name.encode()) % 100_000)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _shape(name: str, batch: int = 1) -> tuple:
    import comfy.supported_models as sm

    spec = SPECS[name]
    fmt = getattr(sm, spec.config).latent_format
    c = int(fmt.latent_channels)
    dims = int(getattr(fmt, "latent_dimensions", 2))
    if dims == 1:
        return (batch, c, spec.size)
    if dims == 3:
        return (batch, c, max(1, spec.frames), spec.size, spec.size)
    return (batch, c, spec.size, spec.size)


def latent_format(name: str):
    """The latent format object of ``name``'s class, without building a model."""
    import comfy.supported_models as sm
    return getattr(sm, SPECS[name].config).latent_format()


def latent(name: str, batch: int = 1, seed: int = 0) -> dict:
    """A seeded VAE-space LATENT for ``name``: N(0,1) in model space mapped back through the latent format."""
    fmt = latent_format(name)
    g = torch.Generator().manual_seed(int(seed))
    z = torch.randn(_shape(name, batch), generator=g, dtype=torch.float32)
    return {"samples": fmt.process_out(z)}


def conditioning(name: str, seed: int = 0) -> list:
    """CONDITIONING of the family's own kind: ``[[cross_attn (1, tokens, ctx), extras]]``."""
    spec = SPECS[name]
    g = torch.Generator().manual_seed(int(seed))
    cond = torch.randn((1, spec.tokens, spec.ctx), generator=g, dtype=torch.float32)
    extra = dict(spec.extras)
    if spec.pooled is not None:
        shape = (1, 1, spec.pooled) if spec.pooled_3d else (1, spec.pooled)
        extra["pooled_output"] = torch.randn(shape, generator=g, dtype=torch.float32)
    if spec.unclip is not None:
        embeds = types.SimpleNamespace(image_embeds=torch.randn((1, spec.unclip), generator=g, dtype=torch.float32))
        extra["unclip_conditioning"] = [{"clip_vision_output": embeds, "strength": 1.0, "noise_augmentation": 0.0}]
    if spec.mask:
        extra["attention_mask"] = torch.ones((1, spec.tokens), dtype=torch.long)
    if spec.t5 is not None:
        extra["conditioning_mt5xl"] = torch.randn((1, *spec.t5), generator=g, dtype=torch.float32)
        extra["attention_mask_mt5xl"] = torch.ones((1, spec.t5[0]), dtype=torch.long)
    if spec.llama is not None:
        extra["conditioning_llama3"] = torch.randn((1, *spec.llama), generator=g, dtype=torch.float32)
    if spec.concat:
        extra["concat_latent_image"] = latent(name, seed=1000 + int(seed))["samples"]
    return [[cond, extra]]


def renamed(name: str, seed: int = DEFAULT_SEED):
    """A fresh (uncached) tiny ``name`` whose config claims a supported_models class no matrix knows, as a family
    added to ComfyUI later would."""
    mp = _build(name, int(seed))
    cfg = mp.model.model_config
    cfg.__class__ = type("FutureFamilyXYZ", (type(cfg),), {})
    return mp


def odd_sampling(mp):
    """A clone with a model_sampling object patch whose noise scaling is x = (1 - sigma/2) x0 + sigma noise:
    neither vp nor flow (what an unknown future sampling looks like)."""
    import comfy.model_sampling as cms

    base = mp.get_model_object("model_sampling")

    class OddNoise(type(base)):
        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            sigma = cms.reshape_sigma(sigma, noise.ndim)
            return sigma * noise + (1.0 - 0.5 * sigma) * latent_image

    odd = OddNoise.__new__(OddNoise)
    odd.__dict__.update(base.__dict__)
    c = mp.clone()
    c.add_object_patch("model_sampling", odd)
    return c


NOISE_SCALE = 8.0   # HiDream-O1's sampling_settings value (ComfyUI 0.33)


def noise_scaled(mp, scale: float = NOISE_SCALE):
    """A clone whose (flow) model_sampling has ``noise_scale`` set, as 0.33's HiDream-O1 sampling settings and
    MiniMax nodes set it: CONST.noise_scaling then makes x = sigma*(scale*noise) + (1-sigma)*x0 (0.3.75's CONST
    ignores the attribute)."""
    import copy
    ms = copy.deepcopy(mp.get_model_object("model_sampling"))
    if hasattr(ms, "set_noise_scale"):
        ms.set_noise_scale(scale)
    else:
        ms.noise_scale = float(scale)
    c = mp.clone()
    c.add_object_patch("model_sampling", ms)
    return c
