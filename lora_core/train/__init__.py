"""In-graph LoRA training: dataset, trainable side paths on an existing model, the loop, kohya saving,
resumable state. No ComfyUI imports (nodes/train.py adapts ComfyUI's objects).

    from lora_core import train
    targets = train.find_unet_targets(unet, kinds=("attn", "ff", "proj"))
    net = train.LoRANetwork(targets, rank=8, alpha=4, seed=0)
    trainer = train.LoraTrainer(backend, net, dataset, train.TrainConfig(steps=500), encode_images=..., encode_text=...,
                                output=train.OutputFiles(folder, "my_lora"))
    result = trainer.run()
"""
from .algorithms import ALGORITHMS, LYCORIS_ALGORITHMS, DoRAPath, LoHaPath, LoKrPath
from .backends import DiffusersBackend, diffusers_ldm_namer, transformers_text_encoder, unlock_inference_params
from .dataset import (CAPTION_POLICIES, BatchPlan, CaptionOptions, Sample, TrainDataset, from_images, load_folder,
                      make_buckets, nearest_bucket, process_caption)
from .injection import (UNET_KINDS, LoRANetwork, LoRASidePath, OutOfPlaceAdds, Target, find_denoiser_targets,
                        with_norms_biases,
                        find_key_map_te_targets, find_te_targets, find_unet_targets, unet_kind)
from .loop import (OPTIMIZERS, PRECISIONS, SCHEDULERS, LoraTrainer, TrainConfig, TrainResult, cat_cond, lr_factor,
                   objective_of, sd_alphas_cumprod, snr_weights, loss_weights, LOSS_WEIGHTINGS)
from .quant import BASE_QUANT, LORA_DTYPES, FrozenBase, nf4_codec, resolve_base_quant
from .objective import TIMESTEP_SAMPLING, Objective, ResolutionShift, parse_timestep_range, time_shift
from .save import OutputFiles, kohya_metadata, read_session_id, save_lora
from .state import load_state, save_state
from .hooks import PreviewHook, TrainHook, outside_training
from .validation import ValidationLoss, split_dataset, validation_set

__all__ = [
    "DiffusersBackend", "diffusers_ldm_namer", "transformers_text_encoder", "unlock_inference_params",
    "CAPTION_POLICIES", "BatchPlan", "CaptionOptions", "Sample", "TrainDataset", "from_images", "load_folder",
    "make_buckets", "nearest_bucket", "process_caption", "UNET_KINDS", "LoRANetwork", "LoRASidePath", "Target",
    "find_te_targets", "find_unet_targets", "unet_kind", "OPTIMIZERS", "PRECISIONS", "SCHEDULERS", "LoraTrainer",
    "TrainConfig", "TrainResult", "cat_cond", "lr_factor", "sd_alphas_cumprod", "snr_weights", "loss_weights", "LOSS_WEIGHTINGS", "OutputFiles",
    "kohya_metadata", "read_session_id", "save_lora", "load_state", "save_state", "OutOfPlaceAdds",
    "find_denoiser_targets", "with_norms_biases", "find_key_map_te_targets", "objective_of", "TIMESTEP_SAMPLING", "Objective",
    "ResolutionShift", "time_shift", "parse_timestep_range", "BASE_QUANT", "LORA_DTYPES", "FrozenBase", "nf4_codec",
    "resolve_base_quant", "ALGORITHMS", "LYCORIS_ALGORITHMS", "DoRAPath", "LoHaPath", "LoKrPath",
    "PreviewHook", "TrainHook", "outside_training", "ValidationLoss", "split_dataset", "validation_set",
]
