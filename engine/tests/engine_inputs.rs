//! Loading a tiny Hugging Face directory end to end, and bad input: each a clear error that
//! names the file, line or field (missing or corrupt model files, unknown architectures,
//! malformed or empty data, placements outside the model, impossible ranks).

mod common;

use candle_core::{DType, Device, Tensor};
use common::files::{hf_spec, write_gguf_header, write_hf_dir, write_jsonl, TOKENIZER_SIZE};
use common::{tiny_config, tiny_model};
use lorasweep_engine::adapter::Variant;
use lorasweep_engine::data::{Message, Role};
use lorasweep_engine::jobs::{self, DataSource};
use lorasweep_engine::loader;
use lorasweep_engine::model::ModelSource;
use lorasweep_engine::placement::Resolve;
use lorasweep_engine::probe::{self, ProbeSettings};

fn hf_dir(arch: &'static str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(dir.path(), &hf_spec(arch, 12));
    dir
}

#[test]
fn a_hugging_face_directory_loads_end_to_end() {
    for arch in ["llama", "qwen2"] {
        let dir = hf_dir(arch);
        let spec = hf_spec(arch, 12);
        let source = ModelSource::from_path(dir.path()).unwrap();
        assert_eq!(source, ModelSource::HfDir(dir.path().to_path_buf()));
        let model = loader::load(&source, &Device::Cpu, DType::F32).unwrap();
        // config.json → the geometry it declares.
        assert_eq!(model.config(), &tiny_config(&spec), "{arch}");
        // model.safetensors → the very weights written.
        let direct = tiny_model(&spec);
        let diff = common::max_abs_diff(
            &common::probe_logits(&model.transformer),
            &common::probe_logits(&direct),
        );
        assert_eq!(diff, 0.0, "{arch}: weights read from safetensors differ");
        assert_eq!(model.digest.len(), 64);
        // tokenizer.json and tokenizer_config.json → the tokenizer and template.
        let text = "Is the heat in? Ünïcödé ✓";
        let ids = model.tokenizer.encode(text).unwrap();
        assert!(ids.iter().all(|&id| (id as usize) < TOKENIZER_SIZE));
        assert_eq!(model.tokenizer.decode(&ids).unwrap(), text);
        assert!(
            model.tokenizer.eos_token_ids().contains(&2),
            "<|im_end|> ends a turn"
        );
        assert_eq!(model.tokenizer.pad_token_id(), 0);
        let messages = [Message {
            role: Role::User,
            content: "hi".into(),
        }];
        let prompt = model.chat_template.render(&messages, true).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let reply = lorasweep_engine::generate::chat(
            &model.transformer,
            &model.tokenizer,
            &model.chat_template,
            &messages,
            &lorasweep_engine::generate::GenerationSettings {
                max_new_tokens: 4,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(reply.tokens.len() <= 4 && reply.prompt_tokens > 0);
    }
}

#[test]
fn the_weight_digest_follows_the_weights() {
    let a = hf_dir("llama");
    let b = tempfile::tempdir().unwrap();
    write_hf_dir(b.path(), &hf_spec("llama", 13));
    let load = |d: &tempfile::TempDir| {
        loader::load(
            &ModelSource::HfDir(d.path().to_path_buf()),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap()
        .digest
    };
    assert_eq!(load(&a), load(&a));
    assert_ne!(load(&a), load(&b));
}

fn load_err(path: &std::path::Path) -> String {
    jobs::load_model(path.to_str().unwrap(), &Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

#[test]
fn missing_model_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere/model.gguf");
    let err = load_err(&missing);
    assert!(err.contains("nowhere/model.gguf"), "{err}");
    assert!(
        err.contains("no packaged model, file or directory"),
        "{err}"
    );
    let err = loader::load(
        &ModelSource::Gguf(missing.clone()),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("nowhere/model.gguf"), "{err}");
    let err = ModelSource::from_path(&missing).unwrap_err().to_string();
    assert!(
        err.contains("model not found") && err.contains("nowhere/model.gguf"),
        "{err}"
    );
}

#[test]
fn corrupt_gguf_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = common::files::SplitMix::new(5);
    let noise: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
    let random = dir.path().join("random.gguf");
    std::fs::write(&random, &noise).unwrap();
    let err = load_err(&random);
    assert!(
        err.contains("random.gguf") && err.contains("not GGUF"),
        "{err}"
    );
    // The right magic, then garbage: the header itself cannot be read.
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, [b"GGUF".as_slice(), &noise].concat()).unwrap();
    let err = load_err(&garbage);
    assert!(
        err.contains("garbage.gguf") && err.contains("not a readable GGUF file"),
        "{err}"
    );
    // Truncated after a valid start.
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(
        &truncated,
        [b"GGUF".as_slice(), &3u32.to_le_bytes()].concat(),
    )
    .unwrap();
    let err = load_err(&truncated);
    assert!(err.contains("truncated.gguf"), "{err}");
    // A readable header without the model's metadata.
    let bare = dir.path().join("bare.gguf");
    write_gguf_header(&bare, &[("general.architecture", "llama")]);
    let err = load_err(&bare);
    assert!(
        err.contains("bare.gguf") && err.contains("missing metadata llama."),
        "{err}"
    );
}

#[test]
fn unknown_architectures_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("gpt2.gguf");
    write_gguf_header(
        &gguf,
        &[("general.architecture", "gpt2"), ("general.name", "tiny")],
    );
    let err = load_err(&gguf);
    assert!(
        err.contains("gpt2.gguf") && err.contains("unsupported architecture \"gpt2\""),
        "{err}"
    );
    assert!(err.contains("llama, qwen2"), "{err}");
    let hf = hf_dir("llama");
    let mut config = hf_spec("llama", 12).config_json();
    config["model_type"] = "gpt2".into();
    std::fs::write(hf.path().join("config.json"), config.to_string()).unwrap();
    let err = load_err(hf.path());
    assert!(
        err.contains("config.json") && err.contains("unsupported architecture \"gpt2\""),
        "{err}"
    );
}

#[test]
fn broken_hugging_face_directories_name_the_file_and_field() {
    // A field missing from config.json.
    let dir = hf_dir("qwen2");
    let mut config = hf_spec("qwen2", 12).config_json();
    config.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );
    // Weights that do not fit the declared geometry.
    let dir = hf_dir("llama");
    let mut config = hf_spec("llama", 12).config_json();
    config["intermediate_size"] = 40.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("mlp.gate_proj.weight") && err.contains("shape"),
        "{err}"
    );
    // No weights, then corrupt weights.
    let dir = hf_dir("llama");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("no *.safetensors"), "{err}");
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x08\0\0\0\0\0\0\0{garbage",
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("not a readable safetensors"),
        "{err}"
    );
    // No tokenizer.
    let dir = hf_dir("llama");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("tokenizer.json"), "{err}");
    // A directory that is no model at all.
    let empty = tempfile::tempdir().unwrap();
    let err = load_err(empty.path());
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn malformed_jsonl_names_the_line() {
    let path = common::fixture("engine/malformed.jsonl");
    let err = DataSource::Jsonl(path)
        .conversations()
        .unwrap_err()
        .to_string();
    assert!(err.contains("malformed.jsonl:3:"), "{err}");
    assert!(err.contains("invalid json"), "{err}");
    // A wrong field on a valid JSON line.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("roles.jsonl");
    write_jsonl(&path, &[("a", "b")]);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"messages\":[{\"role\":\"robot\",\"content\":\"x\"}]}\n");
    std::fs::write(&path, text).unwrap();
    let err = DataSource::Jsonl(path)
        .conversations()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("roles.jsonl:2:") && err.contains("messages[0].role"),
        "{err}"
    );
}

#[test]
fn empty_data_sets_are_refused() {
    let err = DataSource::Jsonl(common::fixture("engine/empty.jsonl"))
        .conversations()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty.jsonl") && err.contains("no conversations"),
        "{err}"
    );
    let err = DataSource::Jsonl(common::fixture("engine/absent.jsonl"))
        .conversations()
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.jsonl"), "{err}");
    // Conversations whose responses all lie beyond max_len leave nothing to train on.
    let dir = hf_dir("llama");
    let model = jobs::load_model(dir.path().to_str().unwrap(), &Device::Cpu).unwrap();
    let conversations = DataSource::Jsonl(common::fixture("engine/chat.jsonl"))
        .conversations()
        .unwrap();
    let err = jobs::encode_all(&model, &conversations, 6)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("none of the 12 conversations") && err.contains("max_len 6"),
        "{err}"
    );
}

#[test]
fn placements_outside_the_model_are_refused() {
    let config = tiny_config(&hf_spec("llama", 12));
    let resolve = |text: &str, rank: usize| {
        lorasweep_engine::placement::parse(text)
            .and_then(|p| p.resolve(&config, None, rank, Variant::Lora, 0))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let err = resolve("explicit:layers.99.mlp.down_proj", 4);
    assert!(
        err.contains("layers.99.mlp.down_proj") && err.contains("has 2 layers"),
        "{err}"
    );
    let err = resolve("explicit:layers.1.mlp.q_proj", 4);
    assert!(
        err.contains("layers.1.mlp.q_proj") && err.contains("not a module path"),
        "{err}"
    );
    let err = resolve("random:15", 4);
    assert!(err.contains("15") && err.contains("only 14"), "{err}");
    let err = resolve("kind:fc1", 4);
    assert!(err.contains("unknown module kind"), "{err}");
    let err = resolve("dominant", 4);
    assert!(err.contains("needs a page probe"), "{err}");
}

#[test]
fn impossible_ranks_are_refused() {
    let config = tiny_config(&hf_spec("llama", 12));
    let resolve = |text: &str, rank: usize| {
        lorasweep_engine::placement::parse(text)
            .unwrap()
            .resolve(&config, None, rank, Variant::Lora, 0)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let err = resolve("all", 0);
    assert!(
        err.contains("rank 0 is invalid") && err.contains("between 1 and"),
        "{err}"
    );
    // k_proj is 16 × 32: rank 17 fits q_proj but not it.
    let err = resolve("all", 17);
    assert!(
        err.contains("rank 17 is invalid for layers.0.self_attn.k_proj (16×32)"),
        "{err}"
    );
    assert!(err.contains("between 1 and 16"), "{err}");
    let err = resolve("explicit:layers.1.mlp.down_proj", 33);
    assert!(
        err.contains("layers.1.mlp.down_proj (32×48)") && err.contains("between 1 and 32"),
        "{err}"
    );
    // The probe puts an adapter on every module: its rank is checked the same way.
    let mut model = tiny_model(&common::TinySpec::new("qwen2", 1));
    let settings = ProbeSettings {
        rank: 40,
        ..ProbeSettings::default()
    };
    let err = probe::attach_probe_adapters(&mut model, &settings)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 40 is invalid"), "{err}");
    let settings = ProbeSettings {
        rank: 0,
        ..ProbeSettings::default()
    };
    let err = probe::attach_probe_adapters(&mut model, &settings)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 0 is invalid"), "{err}");
}

#[test]
fn token_ids_beyond_the_embedding_are_an_error_not_a_panic() {
    let model = tiny_model(&common::TinySpec::new("llama", 1));
    let ids = Tensor::from_vec(vec![1u32, 64, 2], (1, 3), &Device::Cpu).unwrap();
    assert!(model.forward(&ids, 0, None).is_err());
}
