//! Cipher suites and the RMCP+ key material (IPMI v2.0 §13.28–13.32):
//! RAKP HMACs, session integrity key (SIK), K1/K2, integrity codes and
//! AES-CBC-128 with the IPMI confidentiality pad.

use crate::error::{BmcError, Result};
use aes::Aes128;
use cbc::cipher::{block_padding::NoPadding, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use hmac::{Hmac, Mac};

pub const AUTH_RAKP_NONE: u8 = 0x00;
pub const AUTH_RAKP_HMAC_SHA1: u8 = 0x01;
pub const AUTH_RAKP_HMAC_SHA256: u8 = 0x03;
pub const INTEGRITY_NONE: u8 = 0x00;
pub const INTEGRITY_HMAC_SHA1_96: u8 = 0x01;
pub const INTEGRITY_HMAC_SHA256_128: u8 = 0x04;
pub const CONFIDENTIALITY_NONE: u8 = 0x00;
pub const CONFIDENTIALITY_AES_CBC_128: u8 = 0x01;

const AES_BLOCK_LEN: usize = 16;

/// The hash behind the RAKP and integrity HMACs of a suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    pub fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
        match self {
            Hash::Sha1 => {
                let mut mac = Hmac::<sha1::Sha1>::new_from_slice(key).expect("hmac takes any key");
                parts.iter().for_each(|part| mac.update(part));
                mac.finalize().into_bytes().to_vec()
            }
            Hash::Sha256 => {
                let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("hmac takes any key");
                parts.iter().for_each(|part| mac.update(part));
                mac.finalize().into_bytes().to_vec()
            }
        }
    }

    /// Length of the full HMAC output.
    pub fn output_len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
        }
    }

    /// RAKP4's integrity check value is truncated (§13.31: 12 bytes for
    /// HMAC-SHA1, 16 for HMAC-SHA256).
    pub fn rakp4_icv_len(self) -> usize {
        match self {
            Hash::Sha1 => 12,
            Hash::Sha256 => 16,
        }
    }
}

/// A cipher suite we implement. Only these three exist in this client:
/// 17 and 3 are the ones a BMC should offer; 0 (no authentication at all)
/// exists only so an operator can opt into it knowingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSuite {
    pub id: u8,
    /// `None` for RAKP-none (suite 0).
    pub hash: Option<Hash>,
    pub integrity: u8,
    pub confidentiality: u8,
}

impl CipherSuite {
    pub const SUITE_0: CipherSuite =
        CipherSuite { id: 0, hash: None, integrity: INTEGRITY_NONE, confidentiality: CONFIDENTIALITY_NONE };
    pub const SUITE_3: CipherSuite = CipherSuite {
        id: 3,
        hash: Some(Hash::Sha1),
        integrity: INTEGRITY_HMAC_SHA1_96,
        confidentiality: CONFIDENTIALITY_AES_CBC_128,
    };
    pub const SUITE_17: CipherSuite = CipherSuite {
        id: 17,
        hash: Some(Hash::Sha256),
        integrity: INTEGRITY_HMAC_SHA256_128,
        confidentiality: CONFIDENTIALITY_AES_CBC_128,
    };

    pub fn from_id(id: u8) -> Result<CipherSuite> {
        match id {
            0 => Ok(Self::SUITE_0),
            3 => Ok(Self::SUITE_3),
            17 => Ok(Self::SUITE_17),
            other => {
                Err(BmcError::Config { reason: format!("cipher suite {other} is not supported (supported: 17, 3, 0)") })
            }
        }
    }

    pub fn authentication_algorithm(self) -> u8 {
        match self.hash {
            None => AUTH_RAKP_NONE,
            Some(Hash::Sha1) => AUTH_RAKP_HMAC_SHA1,
            Some(Hash::Sha256) => AUTH_RAKP_HMAC_SHA256,
        }
    }

    /// Bytes of auth code at the end of every authenticated session packet.
    pub fn integrity_code_len(self) -> usize {
        match self.integrity {
            INTEGRITY_HMAC_SHA1_96 => 12,
            INTEGRITY_HMAC_SHA256_128 => 16,
            _ => 0,
        }
    }
}

/// Everything the RAKP exchange mixes into its HMACs.
#[derive(Debug, Clone)]
pub struct RakpInputs<'a> {
    pub console_session_id: u32,
    pub managed_session_id: u32,
    pub console_random: &'a [u8; 16],
    pub managed_random: &'a [u8; 16],
    pub managed_guid: &'a [u8; 16],
    /// The privilege byte exactly as sent in RAKP1, lookup bit included.
    pub role: u8,
    pub username: &'a [u8],
}

impl RakpInputs<'_> {
    fn username_len(&self) -> [u8; 1] {
        [self.username.len() as u8]
    }

    /// RAKP2 key exchange auth code the BMC must send: HMAC_Kuid(SIDm, SIDc, Rm, Rc, GUIDc, ROLEm, ULENm, UNAMEm).
    pub fn rakp2_auth_code(&self, hash: Hash, user_key: &[u8]) -> Vec<u8> {
        hash.hmac(
            user_key,
            &[
                &self.console_session_id.to_le_bytes(),
                &self.managed_session_id.to_le_bytes(),
                self.console_random,
                self.managed_random,
                self.managed_guid,
                &[self.role],
                &self.username_len(),
                self.username,
            ],
        )
    }

    /// RAKP3 auth code we send: HMAC_Kuid(Rc, SIDm, ROLEm, ULENm, UNAMEm).
    pub fn rakp3_auth_code(&self, hash: Hash, user_key: &[u8]) -> Vec<u8> {
        hash.hmac(
            user_key,
            &[
                self.managed_random,
                &self.console_session_id.to_le_bytes(),
                &[self.role],
                &self.username_len(),
                self.username,
            ],
        )
    }

    /// Session integrity key: HMAC_Kg(Rm, Rc, ROLEm, ULENm, UNAMEm). Without a
    /// BMC key (Kg) configured, the user key stands in for it.
    pub fn session_integrity_key(&self, hash: Hash, kg: &[u8]) -> Vec<u8> {
        hash.hmac(kg, &[self.console_random, self.managed_random, &[self.role], &self.username_len(), self.username])
    }

    /// RAKP4 integrity check value the BMC must send: HMAC_SIK(Rm, SIDc, GUIDc), truncated.
    pub fn rakp4_integrity_check(&self, hash: Hash, sik: &[u8]) -> Vec<u8> {
        let mut icv = hash.hmac(sik, &[self.console_random, &self.managed_session_id.to_le_bytes(), self.managed_guid]);
        icv.truncate(hash.rakp4_icv_len());
        icv
    }
}

/// Length of the constants K1 and K2 are derived from. §13.32 defines them as 20 bytes, and
/// BMCs and ipmitool keep 20 bytes for HMAC-SHA256 (suite 17) too: stretching the constant
/// to the hash length yields keys no real BMC shares.
const ADDITIONAL_KEY_CONSTANT_LEN: usize = 20;

/// K_n = HMAC_SIK(constant n repeated 20 times) (§13.32), for every authentication algorithm.
pub fn additional_key(hash: Hash, sik: &[u8], constant: u8) -> Vec<u8> {
    hash.hmac(sik, &[&[constant; ADDITIONAL_KEY_CONSTANT_LEN]])
}

/// Per-packet integrity code with K1, truncated for the suite's algorithm.
pub fn integrity_code(suite: CipherSuite, k1: &[u8], covered: &[u8]) -> Vec<u8> {
    let (hash, len) = match suite.integrity {
        INTEGRITY_HMAC_SHA1_96 => (Hash::Sha1, 12),
        INTEGRITY_HMAC_SHA256_128 => (Hash::Sha256, 16),
        _ => return Vec::new(),
    };
    let mut code = hash.hmac(k1, &[covered]);
    code.truncate(len);
    code
}

/// The user key Kuid: the password zero-padded to 20 bytes (IPMI v2.0 passwords are at most 20).
pub fn user_key(password: &[u8]) -> Vec<u8> {
    let mut key = password.to_vec();
    if key.len() < 20 {
        key.resize(20, 0);
    }
    key
}

/// AES-CBC-128 payload encryption (§13.29): IV, then the ciphertext of the
/// data followed by pad bytes 01h, 02h, … and the pad length.
pub fn encrypt_aes_cbc_128(k2: &[u8], iv: &[u8; 16], plaintext: &[u8]) -> Vec<u8> {
    let pad_len = (AES_BLOCK_LEN - (plaintext.len() + 1) % AES_BLOCK_LEN) % AES_BLOCK_LEN;
    let mut buffer = plaintext.to_vec();
    buffer.extend((1..=pad_len as u8).collect::<Vec<u8>>());
    buffer.push(pad_len as u8);
    let cipher = cbc::Encryptor::<Aes128>::new_from_slices(&k2[..16], iv).expect("aes-128 key and iv are 16 bytes");
    let ciphertext = cipher.encrypt_padded_vec_mut::<NoPadding>(&buffer);
    let mut payload = iv.to_vec();
    payload.extend_from_slice(&ciphertext);
    payload
}

pub fn decrypt_aes_cbc_128(k2: &[u8], payload: &[u8]) -> Result<Vec<u8>> {
    if payload.len() < 2 * AES_BLOCK_LEN || payload.len() % AES_BLOCK_LEN != 0 {
        return Err(BmcError::protocol("encrypted payload length is not iv plus whole blocks"));
    }
    let (iv, ciphertext) = payload.split_at(AES_BLOCK_LEN);
    let cipher = cbc::Decryptor::<Aes128>::new_from_slices(&k2[..16], iv).expect("aes-128 key and iv are 16 bytes");
    let mut plaintext = cipher
        .decrypt_padded_vec_mut::<NoPadding>(ciphertext)
        .map_err(|_| BmcError::protocol("aes-cbc decryption failed"))?;
    let pad_len = usize::from(*plaintext.last().expect("at least one block"));
    if pad_len >= AES_BLOCK_LEN || pad_len + 1 > plaintext.len() {
        return Err(BmcError::protocol("aes-cbc confidentiality pad length invalid"));
    }
    let data_len = plaintext.len() - 1 - pad_len;
    let pad_ok =
        plaintext[data_len..data_len + pad_len].iter().enumerate().all(|(index, byte)| usize::from(*byte) == index + 1);
    if !pad_ok {
        return Err(BmcError::protocol("aes-cbc confidentiality pad bytes invalid"));
    }
    plaintext.truncate(data_len);
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_round_trip_for_every_pad_length() {
        let k2 = [7u8; 20];
        let iv = [9u8; 16];
        for len in 0..40 {
            let plaintext: Vec<u8> = (0..len as u8).collect();
            let payload = encrypt_aes_cbc_128(&k2, &iv, &plaintext);
            assert_eq!(payload.len() % 16, 0);
            assert_eq!(decrypt_aes_cbc_128(&k2, &payload).unwrap(), plaintext);
        }
    }

    #[test]
    fn hmac_sha1_rfc2202_case_1() {
        let mac = Hash::Sha1.hmac(&[0x0b; 20], &[b"Hi There"]);
        assert_eq!(
            mac,
            [
                0xb6, 0x17, 0x31, 0x86, 0x55, 0x05, 0x72, 0x64, 0xe2, 0x8b, 0xc0, 0xb6, 0xfb, 0x37, 0x8c, 0x8e, 0xf1,
                0x46, 0xbe, 0x00
            ]
        );
    }
}
