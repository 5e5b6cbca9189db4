"""The encoder's pieces around the attention: the patched attention layer, the Block and the token-chunked steps."""
