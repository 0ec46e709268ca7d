"""What a checkpoint is: its architecture, layers and transformer, latent attention and experts, LoRA adapters, the
tokenizer and chat templates, and loading and saving in transformers' format. Imports nothing from the other packages.
"""
