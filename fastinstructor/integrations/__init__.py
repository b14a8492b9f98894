"""Adapters for the frameworks people embed text through, one module per framework, each behind its own extra:

- ``fastinstructor.integrations.langchain``: ``InstructorEmbeddings``, a LangChain ``Embeddings``
  (``pip install 'fastinstructor[langchain]'``);
- ``fastinstructor.integrations.llamaindex``: ``InstructorEmbedding``, a LlamaIndex ``BaseEmbedding``
  (``[llamaindex]``);
- ``fastinstructor.integrations.chroma``: ``InstructorEmbeddingFunction``, a Chroma ``EmbeddingFunction``
  (``[chroma]``);
- ``fastinstructor.integrations.haystack``: ``InstructorTextEmbedder`` and ``InstructorDocumentEmbedder``, Haystack
  components (``[haystack]``).

Importing this package imports no framework; importing one module imports its framework only, and says which extra to
install when it is missing. Each adapter takes a model id or folder with ``fastinstructor.load``'s ``backend``,
``precision`` and ``device`` (and any other ``load`` option in ``load_options``), or a loaded ``Instructor``, and
embeds through ``Instructor.encode``: the batching, tokenization and backend are the library's.
"""
