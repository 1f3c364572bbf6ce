"""One generation step and what feeds it: prompts, sampling, the image position step, the answer token step."""
