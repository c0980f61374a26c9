"""INPUT_TYPES / outputs of the ComfyUI core nodes our workflows use, as ComfyUI defines them
(nodes.py at Comfy-Org/ComfyUI a125cd8), so workflows can be checked without ComfyUI."""

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]

NATIVE_NODES = {
    "LoadImage": {
        "input": {"required": {"image": ([], {"image_upload": True})}},
        "output": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    },
    "SaveImage": {
        "input": {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
        "output": [],
        "output_node": True,
    },
    "PreviewImage": {"input": {"required": {"images": ("IMAGE",)}}, "output": [], "output_node": True},
    "VAELoader": {"input": {"required": {"vae_name": ([],)}}, "output": [("VAE", "VAE")]},
    "VAEDecode": {"input": {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}, "output": [("IMAGE", "IMAGE")]},
    "LatentUpscaleBy": {
        "input": {"required": {"samples": ("LATENT",), "upscale_method": (UPSCALE_METHODS,),
                               "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01})}},
        "output": [("LATENT", "LATENT")],
    },
}
# Combos whose options are files on the user's machine: any name is acceptable in a template.
FILE_COMBOS = {("LoadImage", "image"), ("VAELoader", "vae_name"), ("TagMoEModelLoader", "base_model"),
               ("TagMoEModelLoader", "tagmoe_weights")}
FRONTEND_ONLY = {"Note", "MarkdownNote"}
