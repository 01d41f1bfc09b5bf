"""`mergeyard recipe convert`: a mergekit config as the mergeyard recipe it means."""

from __future__ import annotations

from pathlib import Path

import typer

from flows.cli_common import JSON, make_app, print_json, stdout, user_errors

recipe_app = make_app(help="Recipes: convert mergekit's YAML to mergeyard's.")


@recipe_app.command()
@user_errors
def convert(
    path: Path = typer.Argument(..., help="a mergekit config (merge_method, base_model, models or slices, ...)"),
    as_json: bool = JSON,
) -> None:
    """Print the mergeyard recipe equivalent to the mergekit config FILE (its canonical form: what lineage records,
    the same whichever format described the merge)."""
    from merging.recipes.recipe import load_recipe

    recipe = load_recipe(path)
    if as_json:
        print_json({**recipe.canonical(), "recipe_hash": recipe.recipe_hash})
        return
    stdout.print(recipe.to_yaml(), end="", highlight=False, markup=False, soft_wrap=True)
    stdout.print(f"# recipe hash {recipe.recipe_hash}", highlight=False, markup=False, soft_wrap=True)
