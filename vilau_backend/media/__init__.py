"""Pixels, frames and files in and out: ComfyUI image tensors to the model's input, video files to
frames, a folder's images read safely, and which folders a typed path may reach."""
