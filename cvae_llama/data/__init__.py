"""One-to-many data for training a CVAE: readers, grouping, the collator, and sampling responses from an LM.

The format everywhere is a `datasets.Dataset` of flat rows `{prompt: str, response: str[, label: int]}`: one
condition `x` (a prompt, a dialogue context, or `""` for unconditional text) and one response `y`. Zhang et al.,
"Latent Variable Modeling for Controllable and Diverse Generation From Large Language Models" (IEEE TAI 2026), train
on *one-to-many* data (the objective): for every prompt, N responses sampled from the fine-tuned LM
([`make_one_to_many`]), of which one training example sees M ([`group_responses`]). [`OneToManyCollator`] turns a
batch of such groups into the tensors the model and the density-gap regulariser need.

| module | what |
|---|---|
| `budgets` | [`DATASET_BUDGETS`] (the paper's prompt / response token budgets) and the default budgets |
| `loaders` | readers of the paper's datasets ([`load_dataset_by_name`]) and of your files; [`split_prompt_response`] |
| `grouping` | [`group_responses`], [`single_response_groups`], [`is_unconditional`] |
| `collator` | [`encode_prompts`], [`left_pad`], [`prompt_inputs`], [`OneToManyCollator`] |
| `one_to_many` | [`make_one_to_many`] |

Example (`lm` a causal LM, `tokenizer` its tokenizer with a pad token):

```python
>>> from cvae_llama.data import DATASET_BUDGETS, OneToManyCollator, group_responses, load_dataset_by_name
>>> from cvae_llama.data import make_one_to_many
>>> rows = load_dataset_by_name("agnews", "../shared/data/agnews", split="validation", tokenizer=tokenizer)
>>> flat = make_one_to_many(lm, tokenizer, rows["prompt"][:64], 32, "agnews-one-to-many", max_new_tokens=32,
...                         labels=rows["label"][:64])
>>> groups = group_responses(flat, group_size=16)  # 64 rows {prompt, responses (16), label}
>>> collator = OneToManyCollator(tokenizer, *DATASET_BUDGETS["agnews"])
>>> batch = collator([groups[0], groups[1]])  # 32 rows: input_ids, attention_mask, labels, group_ids, class_labels
```
"""

from .budgets import DATASET_BUDGETS, DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_RESPONSE_TOKENS
from .collator import IGNORE_INDEX, OneToManyCollator, encode_prompts, left_pad, prompt_inputs
from .grouping import group_responses, is_unconditional, single_response_groups
from .loaders import (
    DATASET_LABEL_NAMES,
    clean_up_tokenization,
    load_agnews,
    load_dailydialog,
    load_dataset_by_name,
    load_prompt_response_file,
    load_text_file,
    load_yelp,
    split_prompt_response,
    unconditional_rows,
)
from .one_to_many import SAMPLING_TEMPERATURE, SAMPLING_TOP_P, make_one_to_many


__all__ = [
    "DATASET_BUDGETS",
    "DATASET_LABEL_NAMES",
    "DEFAULT_MAX_PROMPT_TOKENS",
    "DEFAULT_MAX_RESPONSE_TOKENS",
    "IGNORE_INDEX",
    "OneToManyCollator",
    "SAMPLING_TEMPERATURE",
    "SAMPLING_TOP_P",
    "clean_up_tokenization",
    "encode_prompts",
    "group_responses",
    "is_unconditional",
    "left_pad",
    "load_agnews",
    "load_dailydialog",
    "load_dataset_by_name",
    "load_prompt_response_file",
    "load_text_file",
    "load_yelp",
    "make_one_to_many",
    "prompt_inputs",
    "single_response_groups",
    "split_prompt_response",
    "unconditional_rows",
]
