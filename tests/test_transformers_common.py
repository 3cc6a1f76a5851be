"""transformers' own common tests, run against `CVAELlamaForCausalLM` as against any model of the library.

Users hand this model to code written for every transformers model (evaluation harnesses, peft, trl, accelerate,
scripts that read `config._attn_implementation`); the tests transformers runs on each of its own models are the
contract that code relies on. They come from the source distribution of the installed transformers version,
downloaded once and cached outside the checkout (see `transformers_suite.py`):

- `ModelTesterMixin` (`tests/test_modeling_common.py`): saving and loading, determinism, batching, eager vs. sdpa,
  attention maps, tied weights and the TP plan, gradient checkpointing, training, resizing, `return_dict=False`, ...;
- `ConfigTester` (`tests/test_configuration_common.py`) on `CVAELlamaConfig`;
- `TrainingTesterMixin` (`tests/test_training_mixin.py`): a tiny model overfits a fixed batch, then generates it;
- `TensorParallelTesterMixin` (`tests/test_tensor_parallel_mixin.py`): the TP plan, and 2-process tensor parallelism
  on CPU (gloo) against the unsharded model, forward, backward and generation.

The model runs as a new user would run it: a tiny config (hidden 32, 2 layers, latent 8), `decoder_mode="full"`
(the common tests train the whole model), and transformers treats it as one of its causal LMs (labels for the tests
that ask for them, the causal-LM loss checks). The tests transformers skips for this model say why in their skip
message; they fall into these groups:

- hardware and packages this suite runs without: "test requires accelerator" / "multiple accelerators" / "MPS"
  (CUDA devices, device maps, offloading, flex attention, the compile tests, which transformers also marks "slow"),
  "Flash Attention" 2/3/4 (which the model does not support either), "kernels", "deepspeed", "torchao";
- features the model does not have: composite models and sub-configs ("does not support SDPA" is the composite
  test's message), sequence-to-sequence heads, sparse experts (MoE, grouped_mm, router logits), sliding windows,
  learned position embeddings, `_keep_in_fp32_modules`, checkpoint conversion mappings (its checkpoints use
  transformers' Llama names as they are);
- "no `base_model_class`" (for the causal LM's test classes): the RoPE tests run on the base model, and
  `CVAELlamaBaseModelTest` runs them, with every other common test, on `CVAELlamaModel`;
  `test_rope_scaling_from_config` below runs the same check on the causal LM. The frequency and axial tests check
  transformers' `LlamaRotaryEmbedding` itself.

The source distribution has no `tests/generation/` and no `tests/exporters/` (see `transformers_suite.py`): this
project's own tests cover `generate`, and `test_torch_export` below exports `forward`.
"""

import copy
import tempfile
import unittest
from unittest.mock import patch

import pytest
import torch
import transformers_suite
from conftest import ARCHITECTURE_OVERRIDES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.testing_utils import torch_device

from cvae_llama import CVAELlamaConfig, CVAELlamaForCausalLM, CVAELlamaModel


pytestmark = pytest.mark.slow  # hundreds of tests: minutes in all, though each is quick

common = transformers_suite.load("test_modeling_common")
ConfigTester = transformers_suite.load("test_configuration_common").ConfigTester
TrainingTesterMixin = transformers_suite.load("test_training_mixin").TrainingTesterMixin
tensor_parallel = transformers_suite.load("test_tensor_parallel_mixin")


class CVAELlamaModelTester:
    """What transformers' mixins ask of a model tester (as its `CausalLMModelTester` provides for Llama)."""

    causal_lm_class = CVAELlamaForCausalLM  # the class TrainingTesterMixin trains

    def __init__(self, parent, batch_size=2, seq_length=7, is_training=True, base_model_type="llama",
                 memory_attention="gated"):  # fmt: skip
        self.parent = parent
        self.base_model_type = base_model_type
        self.memory_attention = memory_attention
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_key_value_heads = 2
        self.num_memory_slots = 3
        # the joint memory's attention maps have the memory slots as their first columns; the gated memory's are
        # the text's own softmax
        self.key_length = seq_length + (self.num_memory_slots if memory_attention == "joint" else 0)

    def get_config(self) -> CVAELlamaConfig:
        return CVAELlamaConfig(
            base_model_type=self.base_model_type,
            **ARCHITECTURE_OVERRIDES[self.base_model_type],  # its sliding windows, head size
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=37,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            latent_size=8,
            num_latent_queries=2,
            num_memory_slots=self.num_memory_slots,
            memory_attention=self.memory_attention,
            num_encoder_layers=1,
            gskip_samples=2,
            decoder_mode="full",
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = common.random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


def _tp_backward_impl(rank, model_path, model_class, atol, rtol, tp_plan=None):
    """transformers' `_test_tp_backward_impl` with each forward seeded alike: in training the CVAE draws its latent
    from the posterior (and G-Skip's samples), so the TP and the reference model must draw the same noise."""
    dist = torch.distributed
    model_tp, model, device = tensor_parallel._load_tp_and_reference_models(model_path, model_class, tp_plan)
    model_tp.train()
    model.train()
    common.set_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 64)).to(device)
    labels = torch.randint(0, model.config.vocab_size, (2, 64)).to(device)
    losses = []
    for each in (model, model_tp):
        common.set_seed(1)
        losses.append(each(input_ids, labels=labels).loss)
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0], atol=atol, rtol=rtol)
    failed = {}
    for (name, param), (_, param_tp) in zip(model.named_parameters(), model_tp.named_parameters()):
        assert (param.grad is None) == (param_tp.grad is None), name
        if param.grad is None:
            continue
        grad_tp = param_tp.grad.to_local() if isinstance(param_tp.grad, tensor_parallel.DTensor) else param_tp.grad
        grad = tensor_parallel._reference_grad_shard(
            name, param.grad, grad_tp, rank, dist.get_world_size(), model_tp._tp_plan
        )
        if not torch.allclose(grad.cpu(), grad_tp.cpu(), atol=atol, rtol=rtol):
            failed[name] = (grad.cpu() - grad_tp.cpu()).abs().max().item()
    assert not failed, f"gradients differ: {failed}"
    dist.barrier()


def _tp_generation_impl(rank, model_path, model_class, atol, rtol, max_new_tokens):
    """transformers' `_test_tp_generation_impl` with the latent given: without one, each `generate` call draws its
    own prior sample, so two calls (TP and reference) write different texts by design."""
    model_tp, model, device = tensor_parallel._load_tp_and_reference_models(model_path, model_class)
    model_tp.eval()
    model.eval()
    common.set_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 10)).to(device)
    latent = torch.randn(2, model.config.latent_size).to(device)
    kwargs = dict(latent=latent, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, use_cache=True)  # fmt: skip
    with torch.no_grad():
        output, output_tp = model.generate(input_ids, **kwargs), model_tp.generate(input_ids, **kwargs)
    torch.testing.assert_close(torch.stack(output_tp.scores), torch.stack(output.scores), atol=atol, rtol=rtol)
    assert torch.equal(output.sequences, output_tp.sequences)
    torch.distributed.barrier()


def _tp_generation_quantized_impl(rank, model_path, model_class, max_new_tokens):
    """transformers' `_test_tp_generation_quantized_impl` (Float8 weight-only models, with and without TP, write at
    least 75% the same tokens) with the latent given, for the same reason."""
    distributed = tensor_parallel.DistributedConfig(tp_size=torch.distributed.get_world_size())
    quantization = tensor_parallel.TorchAoConfig(tensor_parallel.Float8WeightOnlyConfig())
    model_tp = model_class.from_pretrained(model_path, distributed_config=distributed, quantization_config=quantization)
    torch.distributed.barrier()
    model = model_class.from_pretrained(model_path, quantization_config=quantization).to(model_tp.device)
    common.set_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 10)).to(model.device)
    latent = torch.randn(1, model.config.latent_size).to(model.device)
    kwargs = dict(latent=latent, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
    with torch.no_grad():
        sequence = model.eval().generate(input_ids, **kwargs)[0]
        sequence_tp = model_tp.eval().generate(input_ids, **kwargs)[0]
    assert (sequence == sequence_tp).float().mean().item() >= 0.75, (sequence.tolist(), sequence_tp.tolist())
    torch.distributed.barrier()


def as_causal_lm():
    """transformers recognises its causal LMs by the class names of its auto mappings (labels in
    `_prepare_for_class`, the `shift_labels` check); CVAELlamaForCausalLM is registered with `AutoModelForCausalLM`
    at run time, so it is added to the names as the library's own would be."""
    return patch.dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, {"cvae_llama": CVAELlamaForCausalLM.__name__})


def as_base_model():
    """For the tests transformers runs on base models only (`MODEL_MAPPING_NAMES`, e.g. `LlamaModel`) and which check
    what holds for the causal LM as well; elsewhere it must not count as one (the training tests pass over base
    models)."""
    return patch.dict(MODEL_MAPPING_NAMES, {"cvae_llama": CVAELlamaForCausalLM.__name__})


# the stand-in GenerationTesterMixin (the source distribution has no tests/generation/): this project's own
# generation tests cover `generate`, which transformers' `test_generation_tester_mixin_inheritance` asks for
@pytest.mark.filterwarnings("default::FutureWarning")  # transformers' deprecation warnings are FutureWarnings
class CVAELlamaModelTest(
    common.ModelTesterMixin,
    TrainingTesterMixin,
    tensor_parallel.TensorParallelTesterMixin,
    transformers_suite.GenerationTesterMixin,
    unittest.TestCase,
):
    all_model_classes = (CVAELlamaForCausalLM,)
    base_model_type = "llama"  # the decoder architecture (the subclasses below: the others)
    memory_attention = "gated"  # the default; `CVAELlamaJointModelTest` below: the paper's joint memory
    # transformers dates a model by the copyright line of its config file and skips this check before 2023; this
    # package's files have no such line, and its `_init_weights` must cover every weight
    test_can_init_all_missing_weights_before_2023 = True

    @classmethod
    def setUpClass(cls):
        # transformers runs its 2-process TP tests (CPU, gloo) on a list of model types; this one is added to it
        types = tensor_parallel.TP_DISTRIBUTED_TEST_MODEL_TYPES | {"cvae_llama"}
        for patcher in (as_causal_lm(), patch.object(tensor_parallel, "TP_DISTRIBUTED_TEST_MODEL_TYPES", types)):
            patcher.start()
            cls.addClassCleanup(patcher.stop)

    def setUp(self):
        self.model_tester = CVAELlamaModelTester(self, base_model_type=self.base_model_type,
                                                 memory_attention=self.memory_attention)  # fmt: skip
        self.config_tester = ConfigTester(
            self, config_class=CVAELlamaConfig, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
            latent_size=16, base_model_type=self.base_model_type,
        )  # fmt: skip

    @tensor_parallel.is_tensor_parallel_test
    def test_tp_backward(self):
        self._skip_if_not_supported()
        self._run_tp(_tp_backward_impl, self.tensor_parallel_atol, self.tensor_parallel_rtol)

    def test_tp_unit_plan_forward_backward(self):
        """transformers' test (since 5.25: `unit_colwise` / `unit_rowwise` attention plans) with its backward check
        seeded alike, as `test_tp_backward`."""
        if not hasattr(tensor_parallel.TensorParallelTesterMixin, "test_tp_unit_plan_forward_backward"):
            self.skipTest("transformers before 5.25 has no unit-plan TP test")
        if self.memory_attention == "gated":  # transformers' own skip, which looks for such parameters in self_attn
            self.skipTest("Attention has additional head-aligned parameters that unit sharding does not support yet "
                          "(the gated memory's gates, one per query head)")  # fmt: skip
        with patch.object(tensor_parallel, "_test_tp_backward_impl", _tp_backward_impl):
            super().test_tp_unit_plan_forward_backward()

    @tensor_parallel.is_tensor_parallel_test
    def test_tp_generation(self):
        self._skip_if_not_supported()
        self._run_tp(_tp_generation_impl, self.tensor_parallel_atol, self.tensor_parallel_rtol, 25)

    @tensor_parallel.is_tensor_parallel_test
    def test_tp_generation_quantized(self):
        self._skip_if_not_supported()
        if not tensor_parallel.is_torchao_available():
            self.skipTest("Test requires torchao")  # as transformers' own; torchao is not a dependency of this project
        self._run_tp(_tp_generation_quantized_impl, 25)

    def _run_tp(self, implementation, *args):
        """As transformers' TP tests run: save a seeded tiny model, load it on 2 ranks with and without TP."""
        with tempfile.TemporaryDirectory() as folder:
            common.set_seed(42)
            CVAELlamaForCausalLM(self._get_tp_config()).save_pretrained(folder, save_original_format=True)
            transformers_suite.run_distributed(self.tensor_parallel_size)(implementation)(
                folder, CVAELlamaForCausalLM, *args
            )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_inputs_embeds_matches_input_ids(self):
        with as_base_model():  # the CVAE's first output, the logits, from ids and from their embeddings
            super().test_inputs_embeds_matches_input_ids()

    def test_model_forward_default_config_values(self):
        with as_base_model():  # a config without pad / bos / eos ids and tie_word_embeddings
            super().test_model_forward_default_config_values()

    def test_rope_scaling_from_config(self):
        """`test_model_rope_scaling_from_config` (run on base models only) on the CVAE: with RoPE scaling in the
        config the model runs, linear and YaRN scaling change its outputs on short and long inputs, dynamic scaling
        only on inputs longer than `max_position_embeddings`."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        short_input = common.ids_tensor([1, 10], config.vocab_size)
        long_input = common.ids_tensor([1, int(config.max_position_embeddings * 1.5)], config.vocab_size)

        def logits(rope_parameters: dict) -> tuple[torch.Tensor, torch.Tensor]:
            scaled = copy.deepcopy(config)
            common._set_config_rope_params(scaled, rope_parameters)
            common.set_seed(42)  # the same weights for every scaling
            model = CVAELlamaForCausalLM(scaled).to(torch_device).eval()
            with torch.no_grad():
                return model(short_input).logits, model(long_input).logits

        original = logits({"rope_type": "default", "rope_theta": 10_000.0, "original_max_position_embeddings": 16384})
        for scaling_type in ("linear", "dynamic", "yarn"):
            with self.subTest(scaling_type):
                short, long = logits({"rope_type": scaling_type, "factor": 10.0, "rope_theta": 10_000.0})
                if scaling_type == "dynamic":
                    torch.testing.assert_close(short, original[0], rtol=1e-5, atol=1e-5)
                else:
                    self.assertFalse(torch.allclose(short, original[0], atol=1e-5))
                self.assertFalse(torch.allclose(long, original[1], atol=1e-5))

    def test_sliding_window_mask(self):
        """transformers' `test_sliding_window_mask` (Qwen's configs: `use_sliding_window`; Mistral's has none, and
        transformers skips it too), with the joint memory's slots as the first columns of each attention map: with the
        window on, a sliding layer's real tokens attend to no real token beyond the window, a full layer's do; with
        it off, no layer masks them; and every token attends to every memory slot."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        if not hasattr(config, "use_sliding_window"):
            self.skipTest(reason="Model does not support sliding window mask")
        seq_len, window = self.model_tester.seq_length, 3
        slots = config.num_memory_slots if config.memory_attention == "joint" else 0  # gated: the text's own maps
        positions = torch.arange(seq_len)
        beyond_window = (positions[None] > positions[:, None]) | (positions[:, None] - positions[None] >= window)
        beyond_window = beyond_window.to(torch_device)  # (query, key): masked by a sliding layer
        inputs["attention_mask"] = torch.ones(self.model_tester.batch_size, seq_len, dtype=torch.long).to(torch_device)
        for use_sliding_window in (True, False):
            values = {**config.to_diff_dict(), "sliding_window": window, "use_sliding_window": use_sliding_window}
            values.pop("layer_types", None)  # derived again from use_sliding_window, as in transformers' test
            values.pop("rope_parameters", None)
            model = CVAELlamaForCausalLM._from_config(CVAELlamaConfig(**values), attn_implementation="eager")
            model.to(torch_device).eval()
            with torch.no_grad():
                attentions = model(**inputs, output_attentions=True).attentions
            for attention, layer_type in zip(attentions, model.config.layer_types, strict=True):
                with self.subTest(use_sliding_window=use_sliding_window, layer_type=layer_type):
                    self.assertTrue((attention[..., :slots] > 0).all())
                    masked = (attention[..., slots:][:, :, beyond_window] == 0).all().item()
                    self.assertEqual(masked, use_sliding_window and layer_type == "sliding_attention")

    def test_torch_export(self):
        """`torch.export` of `forward` (transformers' export tests are not in its source distribution): the exported
        program gives the model's logits, for the default latent and for latents it was not traced with."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = CVAELlamaForCausalLM(config).to(torch_device).eval()
        latent = torch.randn(self.model_tester.batch_size, config.latent_size, device=torch_device)
        for traced, runs in (({}, [{}]), ({"latent": latent}, [{"latent": latent}, {"latent": -2 * latent}])):
            with self.subTest(latent=bool(traced)):
                exported = torch.export.export(model, args=(), kwargs={**inputs, **traced, "use_cache": False})
                for run in runs:
                    with torch.no_grad():
                        expected = model(**inputs, **run, use_cache=False).logits
                    actual = exported.module()(**inputs, **run, use_cache=False).logits
                    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# The same tests around each other decoder architecture, with its own features switched on (`ARCHITECTURE_OVERRIDES`)
class CVAEMistralModelTest(CVAELlamaModelTest):
    base_model_type = "mistral"


class CVAEQwen2ModelTest(CVAELlamaModelTest):
    base_model_type = "qwen2"


class CVAEQwen3ModelTest(CVAELlamaModelTest):
    base_model_type = "qwen3"


class CVAELlamaJointModelTest(CVAELlamaModelTest):
    """The common tests with the paper's joint memory (the default before the gated one): the slots' columns in the
    attention maps."""

    memory_attention = "joint"


class CVAELlamaBaseModelTest(CVAELlamaModelTest):
    """The common tests on the base model, `CVAELlamaModel` (the decoder run with the latent: hidden states, no head),
    as transformers runs them on `LlamaModel`, the base-model-only ones (RoPE scaling) included."""

    all_model_classes = (CVAELlamaModel,)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        patcher = patch.dict(MODEL_MAPPING_NAMES, {"cvae_llama": CVAELlamaModel.__name__})
        patcher.start()
        cls.addClassCleanup(patcher.stop)

    def test_generation_tester_mixin_inheritance(self):
        # the base model has no head, so it does not generate (the causal LM's classes above test `generate`)
        self.assertFalse(CVAELlamaModel.can_generate())
