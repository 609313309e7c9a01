"""Encrypted images: the keys (diskimg.crypto.keys: master key, key slots, derived keys, the
paper key) and what a command was given to unlock them (diskimg.crypto.keyring).

The cipher itself is a block transform (diskimg.transforms.aead); this package derives its key
and seals the metadata.  Importing the package imports nothing: `keyring` is light (the CLI
sets it up for every command that takes key options), `keys` imports the cryptography package
and is imported only when an encrypted image is written or opened.
"""
