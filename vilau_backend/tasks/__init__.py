"""What a user asks for: image and video generation, edits, answers about images and videos, folder captioning."""
