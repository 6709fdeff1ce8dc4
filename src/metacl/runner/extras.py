"""Optional conveniences at the start of a run (`extras` in conf/train.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.syntax import Syntax
from rich.tree import Tree

# The groups a reader looks for first; the other keys follow in the config's order.
FIRST = ("dataset", "model", "method", "trainer", "logger", "callbacks", "paths")


def config_tree(cfg: DictConfig) -> Tree:
    """The composed config as a rich tree: one branch per top-level key, its YAML inside
    (resolved where it can be, e.g. not Hydra's runtime values outside a Hydra run)."""
    tree = Tree("config", guide_style="dim")
    keys = [k for k in FIRST if k in cfg] + [k for k in cfg if k not in FIRST]
    for key in keys:
        branch = tree.add(f"[bold]{key}[/bold]")
        node = cfg._get_node(key)
        try:
            value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) \
                else cfg[key]
        except OmegaConfBaseException:
            value = OmegaConf.to_container(node, resolve=False)
        text = OmegaConf.to_yaml(value) if isinstance(value, dict | list) else str(value)
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    return tree


def apply_extras(cfg: DictConfig, console) -> None:
    """extras.print_config: print the config tree before anything else happens."""
    extras = cfg.get("extras") or {}
    if extras.get("print_config"):
        console.print(config_tree(cfg))
