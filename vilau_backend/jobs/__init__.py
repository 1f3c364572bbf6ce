"""Dataset jobs: a whole folder captioned or a file of prompts generated, by one process or many.

Each process of a job (`torchrun`, `accelerate launch`, or a plain run as one process) takes its
share of the items by their place in the job's fixed order (`processes.py`), writes each finished
item whole, logs it to its own JSON-lines file, and shows its own progress bar (`records.py`);
the main process then writes the merged summary. A rerun does only what has no output yet.
"""
