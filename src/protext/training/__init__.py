"""The training side of protext: learning prompts, the paper's protocols, datasets, descriptions by LLM.

Nothing used at inference (`protext.classifier`, `heads`, `serve`, `label`, `export`, ...)
imports this package, so serving a classifier never loads the training code.
"""
