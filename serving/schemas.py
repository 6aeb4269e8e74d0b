"""Request and response schemas (pydantic); they appear in the service's OpenAPI page."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ModelInfo(BaseModel):
    registered_model: str = Field(description="MLflow registered model name, e.g. medzoo-organamnist")
    version: str = Field(description="registered model version")
    architecture: str
    dataset: str
    val_acc: float | None = Field(description="validation accuracy of the selected epoch")
    test_acc: float | None = Field(description="test accuracy, evaluated once after selection")


class Prediction(BaseModel):
    task: str = Field(description="dataset the model was trained on")
    label: str = Field(description="predicted class name")
    class_index: int
    confidence: float = Field(description="probability of the predicted class")
    probabilities: dict[str, float] = Field(
        description="class name -> probability, highest first (calibrated: the temperature is in the graph)"
    )
    prediction_set: list[str] | None = Field(
        description="the classes that remain plausible: a conformal set that holds the true class with probability "
        "`coverage` (null for a model exported without conformal calibration)"
    )
    coverage: float | None = Field(description="the coverage level of `prediction_set` (request field `coverage`)")
    model: ModelInfo


class BatchPrediction(BaseModel):
    task: str
    results: list[Prediction] = Field(description="one prediction per image, in upload order")


class TaskInfo(BaseModel):
    task: str
    aliases: list[str]
    class_names: list[str]
    input_size: int
    in_chans: int
    resize: str
    min_side: int = Field(description="smaller images are refused (422): the model was not made for them")
    max_aspect_ratio: float = Field(description="longer / shorter side; more elongated images are refused (422)")
    colour_required: bool = Field(description="grey images are refused (422) for colour tasks")
    model: ModelInfo
    temperature: float = Field(description="temperature folded into the graph (1.0: not calibrated)")
    coverage_levels: list[float] = Field(description="levels a request may ask for in `coverage` (empty: no sets)")
    largest_batch: int = Field(description="largest adaptive batch among the last 1000 onnxruntime calls")
    card: str | None = Field(description="path of the model card (Markdown); null when this version has none")
    explains: bool = Field(description="POST /explain returns an activation map for this task")


class Catalogue(BaseModel):
    tasks: list[TaskInfo]
    limits: dict[str, int]


class ErrorMessage(BaseModel):
    error: str


class Reloaded(BaseModel):
    changed: list[str] = Field(description="models swapped in: '<name>: <old tag> -> <new tag>'")
    versions: dict[str, str] = Field(description="task -> registered model version now served")


class Explanation(BaseModel):
    prediction: Prediction = Field(description="what POST /classify answers for the same image")
    explained_class: str = Field(description="the class whose map this is: the predicted one unless `class` asked")
    cam: list[list[float]] | None = Field(
        description="the class activation map at the model's input size, rows then columns, scaled to [0, 1] "
        "(null when the model has none, see `note`)"
    )
    overlay_png: str | None = Field(description="base64 PNG: the map over the image the model saw, 224 px")
    note: str = Field(description="how the map was made, or why there is none")
