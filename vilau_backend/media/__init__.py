"""Pixels and frames in and out: ComfyUI image tensors to the model's input, video files to frames."""
