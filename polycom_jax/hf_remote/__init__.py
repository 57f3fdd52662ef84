"""The Hugging Face remote-code files an export of a PolyCom model carries (PyTorch, read by
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`); interop copies them into the
directory. Nothing in polycom_jax imports them: they need torch and transformers."""

import os

FILES = ("configuration_polycom.py", "modeling_polycom.py")
DIRECTORY = os.path.dirname(os.path.abspath(__file__))
MODEL_TYPE = "polycom"
AUTO_MAP = {"AutoConfig": "configuration_polycom.PolycomConfig",
            "AutoModelForCausalLM": "modeling_polycom.PolycomForCausalLM"}
ARCHITECTURE = "PolycomForCausalLM"
