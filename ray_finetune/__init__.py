"""ray_finetune: self-hosted fine-tuning with the Databricks Foundation Model Fine-tuning API.

    from ray_finetune import foundation_model as fm
"""
__version__ = "0.1.0"
