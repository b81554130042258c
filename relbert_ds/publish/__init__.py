"""Publishing an exported model: its model card (``model_card``) and the upload to the Hugging Face hub
(``hub``). Imports ``model`` and ``data`` only.
"""
