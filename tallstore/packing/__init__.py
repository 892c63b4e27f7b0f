"""Packing: plan which tensors are masked, process them block by block, publish the archive."""
