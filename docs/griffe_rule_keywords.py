"""griffe extension: the API reference shows a ``@rule_keywords`` function's public signature
(also ``@rule_keywords(collect=...)``: ParetoLoRA.__init__, merged into the class's heading).

mkdocstrings reads the source, where such a function is written with one ``rule: RuleSpec``
(pareto_lora.rules.rule_keywords adds the loose keywords, one per RuleSpec field, at import). This
takes the parameters from the imported function's ``inspect.signature`` instead, so the page
lists what a caller passes. Nothing else is changed.
"""

import importlib
import inspect

import griffe

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


class RuleKeywords(griffe.Extension):
    def on_function_instance(self, *, node, func, agent, **kwargs) -> None:
        # @rule_keywords, or @rule_keywords(collect=...) (ParetoLoRA.__init__, merged into its class)
        if not any(str(d.value).split("(")[0].endswith("rule_keywords") for d in func.decorators):
            return
        obj = importlib.import_module(func.module.path)
        for part in func.path[len(func.module.path) + 1:].split("."):
            obj = getattr(obj, part)
        params = []
        for p in inspect.signature(obj).parameters.values():
            params.append(griffe.Parameter(
                p.name,
                annotation=None if p.annotation is p.empty else str(p.annotation),
                kind=_KINDS[p.kind],
                default=None if p.default is p.empty else repr(p.default),
            ))
        func.parameters = griffe.Parameters(*params)
