"""State side: the static steering buffers and how user steerings are staged into them."""
