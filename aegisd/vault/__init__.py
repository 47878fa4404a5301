"""The vault: master key, key slots, sealed secrets and the metadata around them."""
