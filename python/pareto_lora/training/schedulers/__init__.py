"""Learning-rate schedulers beside the gradient rules: CoMMIT (coordinated learning rates of the LLM
side and the feature side of a multimodal model, from the balance coefficient kappa).

    sched = CoMMIT(optimizer, llm_group=0, feature_group=1)   # replaces optimizer.step()

CoMMIT changes no gradient, so it is not a ParetoLoRA rule or balancer: it works like an LR
scheduler over two parameter groups of an optimizer, with any rule (usually ``sum``).
``CoMMITCallback`` (:mod:`.hf_commit`, imported on demand: it needs transformers) runs it inside a
transformers Trainer. (``pareto_lora.training.balancers`` re-exports CoMMIT for one release.)
"""

from .commit import CoMMIT, coordinated_lrs, kl_drift

__all__ = ["CoMMIT", "coordinated_lrs", "kl_drift"]
