"""One image and chains of images: reading, writing, resolving, describing."""
