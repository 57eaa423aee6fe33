"""Execution engines that spread batch inference over several processes or machines."""
