"""Drop-in interfaces of other attention libraries on attnops (``compat.flash_attn``)."""
